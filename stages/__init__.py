"""Stage files shipped with oneencoder (TOML package data)."""
