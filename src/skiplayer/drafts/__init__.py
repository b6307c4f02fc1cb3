"""Where draft candidates come from besides the model's own shallow layers: n-gram lookup, and the token tree that
merges candidates of every source into one verification pass."""
from skiplayer.drafts.ngram import NGramLookup
from skiplayer.drafts.tree import TokenTree

__all__ = ["NGramLookup", "TokenTree"]
