"""Built-in modalities, installed as ``oneencoder.modalities``: one file each."""
