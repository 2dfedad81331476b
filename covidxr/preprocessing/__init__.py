"""How a decoded film becomes the network's input: the preprocessing settings (the one definition),
the geometry and augmentations, and the scanner-style augmentation."""
