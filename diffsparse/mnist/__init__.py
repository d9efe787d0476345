"""The MNIST demo material, shared by the training and calibration stages.

  * ``dataset``  the official MNIST test set (shipped in ``data/``, md5-checked) as padded 32x32 images;
  * ``metrics``  the pretrained MNIST classifier (PyPI ``digit-recognizer-py``): accuracy, MNIST-FID,
                 its features for the distillation loss, and PSNR/SSIM; ``require_classifier`` checks
                 the install up front;
  * ``recipe``   the demo DiT's training, sampling and evaluation (``python -m diffsparse.mnist.recipe``).

Layering: this package may import the core, ``diffsparse.runtime`` and ``diffsparse.export``;
``diffsparse.train`` and ``diffsparse.calibrate`` import it, never the other way round.
"""
