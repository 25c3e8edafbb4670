"""omnipeft vision domain: VTAB-1k image classification with any core method.

* ``vision.data``: ``VTABDataModule`` over NOAH's VTAB-1k list-file layout, the protocols.
* ``vision.backbones``: timm / open_clip backbones, local or hub weights, q/k/v splitting.
* ``vision.module``: ``VisionClassifier`` (peft / full fine-tuning / linear probe).
* ``vision.metrics``: exact top-k accuracy, VTAB-1k group means, the metrics file.
* ``python -m vision.train``: the LightningCLI (fit / validate / test).
* ``python -m vision.sweep``: methods x tasks -> the VTAB-1k table (CSV) and plot (PNG).
* ``python -m vision.demo``: end to end on real digit scans on CPU in minutes.
"""
