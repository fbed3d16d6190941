"""The cascade's offline tools: calibrate a router for a tier pair, evaluate every router.

    python -m cascade.calibrate small=CKPT large=CKPT [out=DIR] ...     # router.json for moe.serve
    python -m cascade.evaluate small=CKPT large=CKPT output=DIR ...     # APGR, CPT and cost of every router

They read prepared data (`data_pipeline`) and checkpoints (`moe`) and write reports; the routing policy
itself, which the service runs, is plain tensor code in `moe.difficulty`.
"""
