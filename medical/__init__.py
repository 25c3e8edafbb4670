"""omnipeft medical domain: chest X-ray classification (MONAI) and Med-VQA (multimodal LLM).

* ``medical.data``: ``CXRDataModule`` over NIH ChestX-ray14 and CheXpert as shipped (patient
  splits, U-Ones / U-Zeros / U-Ignore, label fractions, PNG / JPEG / DICOM via MONAI).
* ``medical.module``: ``CXRClassifier`` on MONAI DenseNet121, timm ViTs or open_clip towers.
* ``medical.metrics``: per-finding AUROC with bootstrap 95% intervals; Med-VQA scores.
* ``python -m medical.train``: the chest X-ray LightningCLI (fit / validate / test).
* ``python -m medical.explain``: Grad-CAM / occlusion overlays as PNGs.
* ``python -m medical.vqa``: PeFoMed-style Med-VQA (VQA-RAD, SLAKE, PathVQA, captions) on a
  timm or open_clip vision tower (``medical.vqa_vision``).
* ``python -m medical.pathvqa_pickle --root ROOT``: PathVQA's question pickles to JSON; the
  module is the project's only pickle reader (every class refused).
* ``medical.synthetic`` / ``medical.vqa_synthetic``: generated folders in the real layouts.
* ``python -m medical.demo`` and ``medical/notebooks/cxr_lora.ipynb``: end to end on CPU.
"""
