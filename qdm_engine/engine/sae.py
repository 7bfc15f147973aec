"""Loading a frozen SAE and turning it into the plain tensors the encode kernels take.

`--sae release:id` goes through SAELens's `SAE.from_pretrained`; a folder goes through
`SAE.load_from_disk` when SAELens is installed, else through a small reader of the same disk format
(`cfg.json` + `sae_weights.safetensors`), so the engine runs where SAELens is absent. Either way the
result is reduced to one `SAEWeights`: W_enc, b_enc, the b_dec subtracted from the input, and the
activation (ReLU, JumpReLU threshold, or TopK k); and the decoder (W_dec, the b_dec added to its output),
for the reconstruction metrics (engine/recon.py). `import sae_lens` stays inside functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qdm_engine.errors import QdmError
from qdm_engine.kernels.encode_moments import sae_encode_reference

SUPPORTED_ARCHITECTURES = ("standard", "jumprelu", "topk")
SUPPORTED_NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm")


@dataclass
class SAEWeights:
    W_enc: torch.Tensor  # [d_in, d_sae] float32
    b_enc: torch.Tensor  # [d_sae]
    b_dec: torch.Tensor  # [d_in], zero when the SAE does not subtract b_dec from its input
    architecture: str
    hook_name: str
    threshold: torch.Tensor | None = None  # JumpReLU
    k: int | None = None  # TopK
    normalize: str = "none"
    identity: dict = field(default_factory=dict)
    # The decoder, x_hat = acts @ W_dec + b_dec_out (then the input normalisation undone): W_dec [d_sae, d_in]
    # float32 (a TopK decoder-norm rescale folded in), b_dec_out [d_in]. None where an SAE was built without one.
    W_dec: torch.Tensor | None = None
    b_dec_out: torch.Tensor | None = None

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def to(self, device: str | torch.device) -> "SAEWeights":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SAEWeights(move(self.W_enc), move(self.b_enc), move(self.b_dec), self.architecture,
                          self.hook_name, move(self.threshold), self.k, self.normalize, self.identity,
                          move(self.W_dec), move(self.b_dec_out))

    @property
    def has_decoder(self) -> bool:
        return self.W_dec is not None and self.b_dec_out is not None

    def norm_scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-token (scale, shift) [T] with normalise_input(x) = (x - shift) / scale, undone on the
        reconstruction as SAELens's decode does (x_hat * scale + shift); None for 'none'."""
        x = x.to(torch.float32)
        if self.normalize == "constant_norm_rescale":  # SAELens: x_hat / (sqrt(d) / ||x||)
            return x.norm(dim=-1) / (self.d_in ** 0.5), torch.zeros(x.shape[0], device=x.device)
        if self.normalize == "layer_norm":  # SAELens: x_hat * std + mu (std of x - mu, without the eps)
            mu = x.mean(dim=-1, keepdim=True)
            return (x - mu).std(dim=-1), mu.squeeze(-1)
        return None

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction [T, d_in] (float32) of activations [T, d_sae]; `x` (the read-outs encoded) is
        needed to undo a per-token input normalisation."""
        if not self.has_decoder:
            raise ValueError("this SAE carries no decoder (W_dec, b_dec)")
        out = acts.to(torch.float32) @ self.W_dec + self.b_dec_out
        ss = self.norm_scale_shift(x) if x is not None else None
        if self.normalize != "none" and ss is None:
            raise ValueError("decoding a normalised SAE needs the read-outs x")
        return out if ss is None else out * ss[0][:, None] + ss[1][:, None]

    def reconstruct(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """decode(encode(x)) [T, d_in] in float32, `chunk` tokens at a time (default: about 2^25
        activations per chunk), so at most chunk x d_sae activations exist at once."""
        chunk = int(chunk or max(1, (1 << 25) // self.d_sae))
        return torch.cat([self.decode(self.encode(x[lo:lo + chunk]), x[lo:lo + chunk])
                          for lo in range(0, x.shape[0], chunk)]) if x.shape[0] else x.new_zeros(0, self.d_in)

    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        """SAELens's per-token input normalisation, in float32 (identity for 'none')."""
        x = x.to(torch.float32)
        if self.normalize == "constant_norm_rescale":
            return x * (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
        if self.normalize == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            return x / (x.std(dim=-1, keepdim=True) + 1e-5)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [T, d_sae] (float32) for read-outs x [T, d_in]; the oracle for the fused path."""
        return sae_encode_reference(self.normalise_input(x), self.W_enc, self.b_enc, self.b_dec, self.threshold, self.k)


def weights_from_state(cfg: dict, state: dict[str, torch.Tensor], identity: dict | None = None) -> SAEWeights:
    """Build SAEWeights from a SAELens config dict and state dict (the disk format's two halves)."""
    arch = cfg.get("architecture", "standard")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise QdmError(f"SAE architecture '{arch}' is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm not in SUPPORTED_NORMALISATIONS:
        raise QdmError(
            f"SAE input normalisation '{norm}' is not supported; supported: {', '.join(SUPPORTED_NORMALISATIONS)} "
            "(fold it into the weights first, e.g. with SAELens)"
        )
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    if not hook:
        raise QdmError("the SAE config names no hook_name; pass --hook blocks.L.hook_resid_post")
    missing = [key for key in ("W_enc", "b_enc", "b_dec") if key not in state]
    if missing:
        raise QdmError(f"the SAE weights lack {', '.join(missing)}; is this a SAELens-format SAE?")
    f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    W_enc, b_enc, b_dec = f32(state["W_enc"]), f32(state["b_enc"]), f32(state["b_dec"])
    if not cfg.get("apply_b_dec_to_input", True):
        b_dec = torch.zeros_like(b_dec)
    threshold, k = None, None
    W_dec = f32(state["W_dec"]) if "W_dec" in state else None
    b_out = f32(state["b_dec"])
    if W_dec is not None and tuple(W_dec.shape) != (W_enc.shape[1], W_enc.shape[0]):
        raise QdmError(f"the SAE's W_dec has shape {tuple(W_dec.shape)}, expected {(W_enc.shape[1], W_enc.shape[0])}")
    if arch == "jumprelu":
        if "threshold" in state:
            threshold = f32(state["threshold"])
        elif "log_threshold" in state:
            threshold = f32(state["log_threshold"]).exp()
        else:
            raise QdmError("a JumpReLU SAE must carry 'threshold' (or 'log_threshold') in its weights")
    elif arch == "topk":
        k = int(cfg.get("k", 0))
        if not 0 < k <= W_enc.shape[1]:
            raise QdmError(f"TopK SAE has k={k}, outside 1..d_sae={W_enc.shape[1]}")
        if cfg.get("rescale_acts_by_decoder_norm", False):
            # pre * ||W_dec_i|| = x @ (W_enc * n) + b_enc * n: fold the rescale into the encoder.
            n = f32(state["W_dec"]).norm(dim=-1)
            W_enc, b_enc = W_enc * n, b_enc * n
            W_dec = W_dec / n[:, None]  # SAELens's decode divides the activations by n again
    return SAEWeights(W_enc, b_enc, b_dec, arch, hook, threshold, k, norm, dict(identity or {}), W_dec, b_out)


def _read_disk_cfg(path: Path) -> dict:
    """cfg.json of a SAELens-format folder, after checking both of its files are there."""
    cfg_file, w_file = path / "cfg.json", path / "sae_weights.safetensors"
    if not cfg_file.is_file() or not w_file.is_file():
        raise QdmError(f"SAE folder '{path}' must contain cfg.json and sae_weights.safetensors")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise QdmError(f"SAE config '{cfg_file}' is not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def _sae_lens_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sae_lens") is not None


def load_sae(spec: str | Path, device: str = "cpu") -> SAEWeights:
    """Load `release:sae_id` (SAELens pretrained) or a SAELens-format folder into SAEWeights on `device`."""
    path = Path(str(spec)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QdmError(f"--sae '{spec}' is a file; pass the SAE folder (cfg.json + sae_weights.safetensors)")
        identity = {"source": str(path.resolve()), "loader": "sae_lens.SAE.load_from_disk"}
        cfg = _read_disk_cfg(path)  # the same checks and messages with or without SAELens
        if _sae_lens_available():
            from sae_lens import SAE

            try:
                sae = SAE.load_from_disk(str(path), device="cpu")
            except Exception as exc:  # SAELens raises many types for a malformed folder
                raise QdmError(f"SAELens could not load SAE folder '{path}': {str(exc).splitlines()[0]}") from exc
            cfg = sae.cfg.to_dict()
            state = sae.state_dict()
        else:
            from safetensors.torch import load_file

            identity["loader"] = "qdm_engine disk reader (sae_lens not installed)"
            state = load_file(str(path / "sae_weights.safetensors"))
    elif ":" in str(spec) and not str(spec).startswith(("/", ".", "~")):
        release, sae_id = str(spec).split(":", 1)
        if not _sae_lens_available():
            raise QdmError("--sae release:id needs SAELens: pip install sae-lens (or pass a local SAE folder)")
        from sae_lens import SAE

        try:
            sae = SAE.from_pretrained(release, sae_id, device="cpu")
        except Exception as exc:  # unknown release/id, no network, ...
            raise QdmError(f"could not load SAE '{spec}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        identity = {"source": str(spec), "release": release, "sae_id": sae_id, "loader": "sae_lens.SAE.from_pretrained"}
        cfg, state = sae.cfg.to_dict(), sae.state_dict()
    else:
        raise QdmError(f"SAE '{spec}' does not exist; pass a SAELens-format folder or release:sae_id")
    weights = weights_from_state(cfg, state, identity)
    weights.identity.update(architecture=weights.architecture, d_in=weights.d_in, d_sae=weights.d_sae,
                            hook_name=weights.hook_name, k=weights.k, normalize=weights.normalize)
    return weights.to(device)
