"""Builders that write JSONL manifests from real, locally installed data."""

# What each held-out subset means (values of a test record's ``heldout`` field, written by
# the pybullet, emoji and soundfont builders and by `data combine`), in report order.
HELDOUT_LABELS = {
    "all": "test split",
    "pose": "new poses of seen objects",
    "object": "unseen objects",
    "seen_combo": "new clips of seen action-object combos",
    "combo": "unseen action-object combos",
    "concept": "unseen emoji in a seen art style",
    "style": "unseen emoji in an unseen art style",
    "tuxpaint": "Tux Paint test stamps (captions never trained on)",
    "unseen-pitch": "named instruments at an unseen pitch and velocity",
    "unseen-velocity": "named drums at an unseen velocity",
}
