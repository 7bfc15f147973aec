"""`qdm-engine methods`: every method a `--method` spec can name, as rows and as a plain-text listing."""

from __future__ import annotations

from qdm_engine.engine.compress import needs_library, spec_methods
from qdm_engine.errors import QdmError

ORDER = ("rtn", "gptq", "awq", "hqq", "nf4", "fp4", "llm-int8", "fp8", "mxfp4", "nvfp4", "gguf",
         "magnitude", "wanda", "sparsegpt")


def method_rows() -> list[dict]:
    methods = spec_methods()
    names = [n for n in ORDER if n in methods] + sorted(n for n in methods if n not in ORDER)
    rows = []
    for n in names:
        cls = methods[n]
        try:
            example = cls(**{k.name: k.default for k in cls.keys}) if needs_library(cls) is None else None
        except QdmError as exc:  # e.g. the GGUF k-quants before `qdm-engine build-ggml`
            example, note = None, str(exc)
        else:
            note = None
        rows.append({
            "method": n,
            "summary": cls.summary,
            "keys": [{"key": k.name, "default": k.default, "help": k.help,
                      **({"choices": list(k.choices)} if k.choices else {})} for k in cls.keys],
            "library": cls.library,
            "calibration": bool(cls.calibration),
            "installed": needs_library(cls) is None,
            "install": needs_library(cls),
            "default_condition": example.name if example is not None else None,
            "note": note,
        })
    return rows


def format_methods(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        flags = ["needs calibration data" if r["calibration"] else "data-free"]
        flags.append("installed" if r["installed"] else f"not installed: {r['install']}")
        lines.append(f"{r['method']:<10} {r['summary']}")
        lines.append(f"{'':<10} library: {r['library']}; {'; '.join(flags)}"
                     + (f"; bare spec audits '{r['default_condition']}'" if r["default_condition"] else ""))
        if r.get("note"):
            lines.append(f"{'':<10} note: {r['note']}")
        for k in r["keys"]:
            default = "absent" if k["default"] is None else k["default"]
            lines.append(f"{'':<12}{k['key']}={default}  {k['help']}")
        lines.append("")
    lines.append("Use: qdm-engine sweep --method NAME[:KEY=VALUE,...] (repeatable), e.g. --method gptq:bits=4,group=128")
    return "\n".join(lines)
