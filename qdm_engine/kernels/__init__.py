"""Compute kernels: one op per module, each with a Triton kernel, its launcher, a plain-torch reference
(the CPU backend and the test oracle) and one dispatch point (`backend.use_triton` decides).

    fake_quant.fake_quant_rtn        RTN fake quantization (per row, group-wise, asymmetric)
    prune.magnitude_prune            magnitude pruning (torch selection, Triton mask apply)
    encode_moments.encode_moments    paired SAE encode fused with the per-feature moments
    moments.FeatureMoments           the float64 streaming moments they produce

A leaf package: it imports nothing from the rest of qdm_engine.
"""
