"""affinitynet: pixel-level labels from image-level tags (Ahn & Kwak, CVPR 2018), and a
segmentation network trained on them."""
__version__ = "0.1.0"
