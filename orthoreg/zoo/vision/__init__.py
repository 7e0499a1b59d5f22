"""The image family of the embedded benchmark (DESIGN.md §3).

:mod:`~orthoreg.zoo.vision.models` (ImageNet MobileNetV2 / EfficientNet-Lite0 written in
the project), :mod:`~orthoreg.zoo.vision.datasets` (MNIST, Fashion-MNIST, Animal-MNIST,
digits, read from pinned archives), :mod:`~orthoreg.zoo.vision.heads` (frozen few-shot
prototype heads, the stand-in for CLIP's zero-shot heads) and
:mod:`~orthoreg.zoo.vision.family` (the family as the pipeline sees it).
"""
