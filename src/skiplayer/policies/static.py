"""`none`: static exit at E with k drafts per round (LayerSkip). The base class already is this policy."""
from skiplayer.policies.base import DraftPolicy as StaticExit

__all__ = ["StaticExit"]
