"""onestep-lm: one-step language generation.

Stage A trains a TarFlow text encoder (Gaussian codebook -> autoregressive affine flows -> N(0, I)) by an
ELBO, which gives an honest upper bound on the negative log-likelihood and an exact inverse. Stage B trains
a bidirectional generator that maps z ~ N(0, I) to text in one forward pass.

    import onestep_lm
    m = onestep_lm.load("runs/flow")
    z = m.encode(["To be, or not to be"])
    m.decode(z)
"""

__version__ = "0.1.0"


def load(run_dir, device="cpu"):
    """Open a trained run folder (any model kind) for encoding, decoding, scoring and sampling."""
    from .api import load as _load

    return _load(run_dir, device=device)
