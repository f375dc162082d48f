#!/usr/bin/env python
"""Train the bundled demo DETR (thin wrapper of ``python -m lrp_ray.demo.train``).

    nice -n 15 python scripts/train_demo.py --out lrp_ray/assets/demo

Writes ``config.yaml``, ``model_final.pth`` (detectron2 layout), ``train_log.txt`` and
``train_metrics.json``; then ``python -m lrp_ray.demo.faithfulness`` and
``python -m lrp_ray.demo.training_md lrp_ray/assets/demo --faithfulness FILE`` update ``TRAINING.md``.
"""

import sys

from lrp_ray.demo.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
