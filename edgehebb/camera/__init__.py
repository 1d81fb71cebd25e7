"""What a camera does to an image, as seeded, physically described perturbations of uint8 images:
the paper's shadows (:mod:`~edgehebb.camera.shadow`) and sensor noise, white balance, exposure, gamma,
vignetting, JPEG and more (:mod:`~edgehebb.camera.conditions`). Shared by evaluation (sweeps) and
training (``edgehebb train --augment``); it imports nothing from the pipeline's stages."""
