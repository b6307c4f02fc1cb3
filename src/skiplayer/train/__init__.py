"""`skiplayer train`: LayerSkip training (layer dropout + early-exit loss). See `skiplayer.train.trainer`."""
