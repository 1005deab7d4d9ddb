"""Evaluation metrics as plain functions (the flows wrap them).

* :mod:`imagegen.evaluate.fid` - Fréchet distance (FID on Inception, FD-<name> on other
  features) and KID, features through clean-fid, cached reference statistics;
* :mod:`imagegen.evaluate.clipscore` - CLIPScore in the Hessel et al. and torchmetrics conventions;
* :mod:`imagegen.evaluate.geneval` - GenEval prompt files, rules, detectors, layout and summary;
* :mod:`imagegen.evaluate.images` - listing and validating image folders.

Submodules are imported on use (torch, clean-fid and open_clip are heavy); see docs/EVALUATE.md.
"""

__all__ = ["clipscore", "fid", "geneval", "images"]
