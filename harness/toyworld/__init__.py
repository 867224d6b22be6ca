"""A toy world in which the whole study runs offline on a CPU and means something.

world.py draws scenes and captions; models.py builds and loads the pretrained toy text-to-image model and evaluation
backbones; pretrain.py trains them from scratch; subject.py writes the example subject's instance images.
"""
