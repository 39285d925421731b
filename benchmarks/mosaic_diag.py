"""Why a Mosaic GPU kernel is slow: ptxas' register and spill report of every kernel of the op, and
the chunk backward's time per named phase from Mosaic GPU's in-kernel profiler.

    python benchmarks/mosaic_diag.py ptxas [--writes 1,2] [--grads '{"warpgroups": 1}' ...] [--out DIR]
    python benchmarks/mosaic_diag.py sass [--writes 1] [--grads JSON ...] [--out DIR]
    python benchmarks/mosaic_diag.py ptx [--writes 1] [--grads JSON ...] [--out DIR]
    python benchmarks/mosaic_diag.py cubin --ptx DIR [--nvdisasm PATH] [--out DIR]   (any machine with CUDA's ptxas)
    python benchmarks/mosaic_diag.py phases --ptx FILE [--profile mosaic_diag.json]   (any machine)
    python benchmarks/mosaic_diag.py mlir [--writes 1] [--grads JSON ...] [--out DIR]   (any machine)
    python benchmarks/mosaic_diag.py profile [--writes 1,2] [--grads '{}' ...] [--out DIR]
    python benchmarks/mosaic_diag.py time [--writes 1] [--grads '{"warpgroups": 3}' ...] [--reps 20]
    python benchmarks/mosaic_diag.py {profile,time} --kernel intra [--opts '{"block": 2}' ...]

`ptxas`: (with `--deviceless` on any machine with the CUDA plugin and ptxas: `deviceless.py`) for each L and
each set of chunk-backward options (`--grads`, `mosaic_options["grads"]`, or
'{"mosaic_options": {...}}' for every stage's; default one row with the defaults), a child process
runs the whole op's forward and backward once at a small shape (B = 2, T = 1024, H = 4, K = V = 128, bf16) with MOSAIC_GPU_DUMP_PTXAS=1, and its ptxas output is
parsed into a row per kernel: registers per thread, spill store / load bytes, and whether ptxas
serialized wgmmas for lack of registers (its C7512 note). Spills matter more than usual here: the
kernels take nearly all of the SM's unified L1 / SMEM, so local memory lives in L2.
`sass`: the same child with MOSAIC_GPU_DUMP_SASS=1: the SASS instruction count of every kernel (straight-line
code that outgrows the SMs' instruction caches is fetched again for every chunk); the raw dump goes to
DIR/sass_L{L}[_peer]_{i}.txt.gz (i: the dump's place in the run). For `ptxas` and `sass`, `--grads
'{"peer": "jla_gdn"}'` runs jax-linear-attention's Gated DeltaNet (L = 1) instead of our op.
`ptx`: the same child with MOSAIC_GPU_DUMP_PTX=1 and MOSAIC_GPU_DUMP_TO=DIR/ptx_L{L}[_peer]_{i}: every
kernel's PTX (for `cubin` elsewhere: the GPU machine has no nvdisasm, which `sass` needs).
`cubin` (no GPU needed): every PTX module under `--ptx` (files, or PTX inside dumped logs) assembled by
ptxas for sm_90a, and each kernel's machine code read from the cubin's `.text.<kernel>` section: bytes and
instructions (16 bytes each), registers, spills. Straight-line code run once per CTA has to be fetched
for every CTA, so code size is a cost of its own. With `--nvdisasm` (the `nvidia-cuda-nvdisasm` wheel has
one; the GPU machine has none), each warpgroup's SASS instructions and spill stores / loads, cut at the
`setmaxnreg` that starts it.
`phases` (no GPU needed): one three-warpgroup kernel's PTX (`--ptx FILE`) cut into warpgroups and, within
each, into the stretches between barrier waits; PTX instructions per stretch and, with `--profile` (a
`profile` run's JSON), the profiled time of the same stretch and the ns it takes per instruction.
`mlir` (no GPU needed): the whole op lowered for CUDA, each kernel's Mosaic GPU MLIR parsed and its ops
counted (total, f32 elementwise, shuffles, exp, inline asm, loads / stores): a code-size proxy.
`profile`: the chunk backward alone at B = 1, T = 2048, H = 16 (1024 CTAs at two value blocks) with
the profiler on (`chunk_grads_backward(profile=...)`); the per-CTA time of each `_Phases` region (median, mean, max) and of the
whole CTA (the three-warpgroup kernel names its phases per warpgroup: "wN.name").
`--kernel intra` profiles / times the intra kernel (solve, P, Qe) instead, at the benchmark shape in both
modes, with `--opts` (an alias of `--grads`) as its keyword arguments.
`time`: the chunk backward alone at the benchmark shape (B * T = 32K, T = 2048, H = 16, K = V = 128,
16-bit start states and cotangents as the pipeline hands them over), median ms per option set, all in
one process (no Triton stages run to make the inputs, unlike `mosaic_stages.py`).
All but `mlir` need a CUDA GPU (Hopper); writes DIR/mosaic_diag.json and prints markdown tables.
Timing the kernels at the benchmark shape is `benchmarks/mosaic_stages.py`'s job.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SERIAL = re.compile(r"wgmma\.mma_async instructions are serialized .* function '(\w+)'")
_SUFFIX = "_mosaic_gpu_kernel"


def parse_ptxas(text: str) -> list[dict]:
    """Rows {kernel, registers, stack, spill_stores, spill_loads, wgmma_serialized} from ptxas' verbose
    output, one per compiled entry function, in order. A kernel compiled twice gives two rows."""
    rows, serialized = [], set()
    for line in text.splitlines():
        if m := _SERIAL.search(line):
            serialized.add(m.group(1))
        elif m := _ENTRY.search(line):
            rows.append({"kernel": m.group(1).removesuffix(_SUFFIX)})
        elif rows and (m := _SPILL.search(line)):
            rows[-1].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif rows and (m := _REGS.search(line)):
            rows[-1]["registers"] = int(m.group(1))
    for row in rows:
        row["wgmma_serialized"] = row["kernel"] + _SUFFIX in serialized
    return rows


def phase_times(events: list[dict]) -> dict:
    """Per-phase per-CTA durations (us) from one Mosaic GPU profiler trace (Chrome trace events: "B" /
    "E" pairs per thread id, one id per CTA): {"ctas", "cta_us": (median, mean, max), "phases":
    {name: (median, mean, max)}}, phases in order of first appearance."""
    opened, durations, spans = {}, {}, {}
    for e in events:
        key = (e["tid"], e["name"])
        if e["ph"] == "B":
            opened[key] = e["ts"]
            spans.setdefault(e["tid"], [e["ts"], e["ts"]])
        elif e["ph"] == "E":
            durations.setdefault(e["name"], []).append(e["ts"] - opened.pop(key))
            spans[e["tid"]][1] = e["ts"]
    stats = lambda d: (statistics.median(d), statistics.mean(d), max(d))
    return {"ctas": len(spans), "cta_us": stats([b - a for a, b in spans.values()]) if spans else None,
            "phases": {name: stats(d) for name, d in durations.items()}}


def _child_ptxas(L: int, grads: dict):
    """(in the child) the whole op's forward and backward once, Mosaic stages with `grads` options (or,
    where `grads` is {"mosaic_options": {...}}, with those options for every stage)."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, HERE)
    from kernels import inputs
    from pallas_kernels import prism_pallas

    K = 128
    (q, k, v, beta, g), do = inputs(jax.random.PRNGKey(0), 2, 1024, L, 4, K, K)
    deviceless = bool(os.environ.get("PRISM_DEVICELESS"))
    if grads.get("peer") == "jla_gdn":  # the peer's kernels, for side-by-side registers / SASS
        from kernels import gdn_fwd

        fwd = gdn_fwd(K ** -0.5)
        if deviceless:  # its Hopper checks look at the local device, which is a CPU
            import jla.ops.mosaic_gpu.gated_delta_rule  # noqa: F401 -- loads the modules patched below

            for module in [m for name, m in sys.modules.items() if name.startswith("jla.")]:
                if hasattr(module, "is_hopper"):
                    module.is_hopper = lambda: True
        loss = lambda q, k, v, beta, g, do: jnp.sum(fwd(q, k, v, beta, g).astype(jnp.float32) * do)
    else:
        options = grads.get("mosaic_options", {"grads": grads})
        platform = "gpu" if deviceless else None  # not the CPU's interpret mode
        loss = lambda q, k, v, beta, g, do: jnp.sum(prism_pallas(q, k, v, beta, g, scale=K ** -0.5, kernel="mosaic",
                                                                 mosaic_options=options, platform=platform)[0]
                                                    .astype(jnp.float32) * do)
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    if deviceless:  # compiled for an H100 here (`deviceless.py`), never run
        from deviceless import abstract

        step.lower(*abstract(q, k, v, beta, g, do)).compile()
    else:
        jax.block_until_ready(step(q, k, v, beta, g, do))


def _run_child(L: int, grads: dict, dump_var: str, timeout_s: float, deviceless: bool = False, **extra_env):
    """`_child_ptxas` in a fresh process with the Mosaic GPU dump variable `dump_var` set (and `extra_env`;
    `deviceless`: compiled for an H100 without one, `deviceless.py`); its result."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    from deviceless import child_env

    env = child_env(deviceless, **{dump_var: "1"}, **extra_env)
    return subprocess.run([sys.executable, os.path.abspath(__file__), "_child", str(L), json.dumps(grads)],
                          env=env, capture_output=True, text=True, timeout=timeout_s)


def ptxas_rows(L: int, grads: dict, timeout_s: float = 300, deviceless: bool = False) -> list[dict]:
    proc = _run_child(L, grads, "MOSAIC_GPU_DUMP_PTXAS", timeout_s, deviceless)
    if proc.returncode:
        raise RuntimeError(f"child failed (L = {L}, grads = {grads}): {proc.stderr[-2000:]}")
    return [dict(row, L=L, grads=grads) for row in parse_ptxas(proc.stdout + proc.stderr)]


_SASS_FUNC = re.compile(r"(?:Function\s*:\s*|\.text\.)(\w+)")
_SASS_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
# Opcode families worth a column: local memory (spills), shared memory, shuffles, barriers, tensor
# core, special functions (exp), conversions, branches.
SASS_FAMILIES = {"LDL": "spill", "STL": "spill", "LDS": "smem", "STS": "smem", "LDSM": "smem", "STSM": "smem",
                 "SHFL": "shfl", "BAR": "bar", "SYNCS": "bar", "HGMMA": "wgmma", "WARPGROUP": "wgmma",
                 "MUFU": "mufu", "F2F": "cvt", "F2FP": "cvt", "I2F": "cvt", "F2I": "cvt", "BRA": "branch"}


def count_sass(text: str) -> list[dict]:
    """Rows {kernel, instructions, ops} from a SASS listing: instruction lines ("/*0a10*/  FFMA ...",
    optionally predicated "@P0 BRA ...") counted under the last function header ("Function : name" or
    ".text.name") seen; ops counts each opcode family of `SASS_FAMILIES` (by the opcode before its
    first '.')."""
    rows = []
    for line in text.splitlines():
        if m := _SASS_FUNC.search(line):
            rows.append({"kernel": m.group(1).removesuffix(_SUFFIX), "instructions": 0, "ops": {}})
        elif m := _SASS_INSTR.search(line):
            if not rows:
                rows.append({"kernel": "?", "instructions": 0, "ops": {}})
            rows[-1]["instructions"] += 1
            family = SASS_FAMILIES.get(m.group(1).split(".")[0], "other")
            rows[-1]["ops"][family] = rows[-1]["ops"].get(family, 0) + 1
    return [r for r in rows if r["instructions"]]


def _sass_table(rows):
    fams = sorted(set(SASS_FAMILIES.values())) + ["other"]
    head = "| L | kernel | instructions | " + " | ".join(fams) + " |"
    return "\n".join([head, "|" + "---|" * (3 + len(fams))] + [
        f"| {r['L']} | {r['kernel']} | {r['instructions']} | " + " | ".join(str(r["ops"].get(f, 0)) for f in fams)
        + " |" for r in rows])


def sass_rows(L: int, grads: dict, out: str, timeout_s: float = 300) -> list[dict]:
    import gzip

    proc = _run_child(L, grads, "MOSAIC_GPU_DUMP_SASS", timeout_s)
    text = proc.stdout + proc.stderr
    tag = "_peer" if grads.get("peer") else ""
    with gzip.open(os.path.join(out, f"sass_L{L}{tag}_{len(glob.glob(os.path.join(out, 'sass_*.txt.gz')))}.txt.gz"),
                   "wt") as f:
        f.write(text)
    if proc.returncode:
        raise RuntimeError(f"child failed (L = {L}, grads = {grads}): {proc.stderr[-2000:]}")
    return [dict(row, L=L, grads=grads) for row in count_sass(text)]


def ptx_rows(L: int, grads: dict, out: str, timeout_s: float = 300, deviceless: bool = False) -> list[dict]:
    """Runs the child with the PTX dump on; rows {file} of what it wrote (and its log, gzipped)."""
    import gzip

    tag = "_peer" if grads.get("peer") else ""
    dump = os.path.join(out, f"ptx_L{L}{tag}_{len(glob.glob(os.path.join(out, 'ptx_L*')))}")
    os.makedirs(dump, exist_ok=True)
    proc = _run_child(L, grads, "MOSAIC_GPU_DUMP_PTX", timeout_s, deviceless, MOSAIC_GPU_DUMP_TO=dump)
    with gzip.open(os.path.join(dump, "child_log.txt.gz"), "wt") as f:
        f.write(proc.stdout + proc.stderr)
    # MOSAIC_GPU_DUMP_TO also receives the MLIR pass logs and layout-inference dumps (~800 MB for the op
    # and the peer in session 23): keep the PTX, ptxas' report and the resources only.
    for f in glob.glob(os.path.join(dump, "**", "*"), recursive=True):
        if os.path.isfile(f) and not f.endswith((".ptx", ".ptxas", ".resources.txt", ".gz")):
            os.remove(f)
    if proc.returncode:
        raise RuntimeError(f"child failed (L = {L}, grads = {grads}): {proc.stderr[-2000:]}")
    return [{"L": L, "grads": grads, "file": os.path.relpath(f, out)}
            for f in sorted(glob.glob(os.path.join(dump, "**", "*"), recursive=True)) if os.path.isfile(f)]


_PTX_START = re.compile(r"^\.version \d", re.M)


def ptx_modules(text: str) -> list[str]:
    """The PTX modules in `text` (a .ptx file or a log holding several): each from its `.version` line to
    its last closing brace before the next one."""
    starts = [m.start() for m in _PTX_START.finditer(text)]
    modules = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    return [m[:m.rfind("\n}") + 2] + "\n" for m in modules]  # up to the last function's closing brace


def _read_text(path: str) -> str:
    """A text file, gzipped or not."""
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rt", errors="replace") as f:
        return f.read()


_TEXT_SECTION = re.compile(r"\]\s+\.text\.(\S+)\s+PROGBITS\s+\S+\s+\S+\s+([0-9a-f]+)")


def _assemble(ptx: str, ptxas: str, arch: str, sizes: bool = False, nvdisasm: str | None = None):
    """One PTX module through `ptxas -v` (RuntimeError with its message if it fails): (`parse_ptxas` rows,
    {kernel: bytes of its `.text.<kernel>` section in the cubin} if `sizes`, read by readelf, else {},
    the cubin's SASS listing by `nvdisasm` (a path) or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "m.ptx"), os.path.join(tmp, "m.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, f"-arch={arch}", "-v", "-o", cubin, src], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-500:])
        sections = subprocess.run(["readelf", "-S", "-W", cubin], capture_output=True, text=True).stdout if sizes else ""
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True).stdout if nvdisasm else None
    return (parse_ptxas(proc.stdout + proc.stderr),
            {m.group(1).removesuffix(_SUFFIX): int(m.group(2), 16) for m in _TEXT_SECTION.finditer(sections)}, sass)


def sass_warpgroups(sass: str) -> list[dict]:
    """Per warpgroup of a kernel that moves each warpgroup's register budget first (`USETMAXREG`, in program
    order: WG0, WG1, ...): {instructions, spill_stores, spill_loads} (STL / LDL instructions) of the SASS
    from its budget move to the next one (the last: to the end); [] without USETMAXREG."""
    regions, current = [], None
    for line in sass.splitlines():
        m = _SASS_INSTR.search(line)
        if not m:
            continue
        op = m.group(1)
        if op.startswith("USETMAXREG"):
            current = {"instructions": 0, "spill_stores": 0, "spill_loads": 0}
            regions.append(current)
        if current is not None:
            current["instructions"] += 1
            current["spill_stores"] += op.startswith("STL")
            current["spill_loads"] += op.startswith("LDL")
    return regions


def cubin_rows(ptx_dir: str, ptxas: str = "ptxas", arch: str = "sm_90a", nvdisasm: str | None = None) -> list[dict]:
    """Rows {source, kernel, bytes, instructions, registers, spill_stores} for every kernel of every PTX
    module found under `ptx_dir`: assembled by `ptxas` into a cubin whose `.text.<kernel>` sections give
    the machine code's size (readelf); with `nvdisasm`, also {warpgroups: `sass_warpgroups`} of a module that
    holds one kernel."""
    rows = []
    for path in sorted(glob.glob(os.path.join(ptx_dir, "**", "*"), recursive=True)):
        if not os.path.isfile(path):
            continue
        try:
            text = _read_text(path)
        except OSError:
            continue
        source = os.path.relpath(path, ptx_dir)
        for i, module in enumerate(ptx_modules(text)):
            try:
                report, sizes, sass = _assemble(module, ptxas, arch, sizes=True, nvdisasm=nvdisasm)
            except RuntimeError as e:
                rows.append({"source": source, "module": i, "error": str(e)})
                continue
            regs = {r["kernel"]: r for r in report}
            rows += [{"source": source, "module": i, "kernel": name, "bytes": size, "instructions": size // 16,
                      "registers": regs.get(name, {}).get("registers"),
                      "spill_stores": regs.get(name, {}).get("spill_stores"),
                      **({"warpgroups": sass_warpgroups(sass)} if sass and len(sizes) == 1 else {})}
                     for name, size in sizes.items()]
    return rows


_SETMAXNREG = re.compile(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+\d+")


def with_budgets(ptx: str, budget) -> str:
    """`ptx` with its setmaxnreg instructions (in program order) set to `budget`, each an `inc` above the
    launch share and a `dec` below or at it, as `chunk_grads_wg3.set_registers` emits them."""
    from pallas_kernels.gpu.mosaic.chunk_grads_wg3 import LAUNCH_REGISTERS

    it = iter(budget)

    def sub(_):
        r = next(it)
        return f"setmaxnreg.{'inc' if r > LAUNCH_REGISTERS else 'dec'}.sync.aligned.u32 {r}"

    return _SETMAXNREG.sub(sub, ptx)


def register_sweep(ptx: str, ptxas: str = "ptxas", arch: str = "sm_90a", total: int = 504, lo: int = 104,
                   hi: int = 256, jobs: int = 2) -> list[dict]:
    """A three-warpgroup kernel's PTX (three `setmaxnreg`, WG0 .. WG2 in order) assembled at every budget
    (multiples of 8 in [lo, hi]) summing to `total` (the launch share of 384 threads is 3 x 168 = 504):
    rows {budget: (WG0, WG1, WG2), registers, spill_stores, wgmma_serialized}. ptxas allocates each warpgroup's
    code within its setmaxnreg budget, so the budget decides where it spills or serializes the wgmmas."""
    import concurrent.futures

    found = _SETMAXNREG.findall(ptx)
    if len(found) != 3:
        raise ValueError(f"register_sweep: expected three setmaxnreg in the PTX, found {len(found)}")
    budgets = [(a, b, total - a - b) for a in range(lo, hi + 1, 8) for b in range(lo, hi + 1, 8)
               if lo <= total - a - b <= hi]

    def one(budget):
        text = with_budgets(ptx, budget)
        try:
            report, _, _ = _assemble(text, ptxas, arch)
            return {"budget": budget, **{k: report[0].get(k) for k in ("registers", "spill_stores", "wgmma_serialized")}}
        except RuntimeError as e:
            return {"budget": budget, "error": str(e)[-300:]}

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, budgets))


_WG_SKIP = re.compile(r"^\s*@%p\d+ bra\s+(\$L__BB\d+_\d+);")
_WAIT = re.compile(r"^\s*bra\.uni\s+LAB_WAIT;")


def _is_instruction(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("//") and not s.endswith(":") and s not in ("{", "}")


def ptx_segments(ptx: str, min_instructions: int = 30) -> list[list[int]]:
    """PTX instructions per warpgroup and per stretch between barrier waits, for a kernel whose warpgroups
    are `pl.when(wg == w)` regions (each a branch around it, `@%p bra $L__BB..`) and whose waits are Mosaic
    GPU's mbarrier try-wait loops (`bra.uni LAB_WAIT`): [[n0, n1, ...] per region]. Stretches shorter than
    `min_instructions` (the code between two waits in a row) are dropped."""
    lines = ptx.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if line.strip().endswith(":")}
    regions, i = [], 0
    while i < len(lines):
        m = _WG_SKIP.match(lines[i])
        if m and labels.get(m.group(1), -1) > i:
            end = labels[m.group(1)]
            body = lines[i + 1:end]
            if any(_WAIT.match(line) for line in body):
                counts, n = [], 0
                for line in body:
                    if _WAIT.match(line):
                        counts.append(n)
                        n = 0
                    elif _is_instruction(line):
                        n += 1
                counts.append(n)
                regions.append([c for c in counts if c >= min_instructions])
                i = end
                continue
        i += 1
    return regions


def profile_groups(phases: dict) -> list[list[tuple[str, float]]]:
    """The three-warpgroup kernel's profiled phases ({"wN.name": (median, mean, max) us}, in program order)
    as, per warpgroup, the runs of work phases between its wait phases ("wN.wait_*"): [[(names, us), ...]]."""
    per_wg: dict[int, list] = {}
    for name, stats in phases.items():
        m = re.match(r"w(\d+)\.(.+)", name)
        if not m:
            continue
        groups = per_wg.setdefault(int(m.group(1)), [[]])
        if m.group(2).startswith("wait"):
            if groups[-1]:
                groups.append([])
        else:
            groups[-1].append((m.group(2), stats[0]))
    return [[("+".join(n for n, _ in g), sum(t for _, t in g)) for g in per_wg[w] if g] for w in sorted(per_wg)]


def phase_rows(ptx: str, phases: dict | None = None) -> list[dict]:
    """Rows {wg, stretch, instructions[, phases, us, ns_per_instruction]}: `ptx_segments` beside the profiled
    time of the same stretch (`profile_groups`), where the profile has as many work runs as the PTX stretches
    or one fewer (a warpgroup that issues copies before its first timed phase: that stretch is untimed)."""
    segments = ptx_segments(ptx)
    groups = profile_groups(phases) if phases else []
    rows = []
    for w, counts in enumerate(segments):
        timed = groups[w] if w < len(groups) else []
        skip = len(counts) - len(timed)  # the untimed leading stretches: 0 or 1, else the two do not match
        for j, n in enumerate(counts):
            row = {"wg": w, "stretch": j, "instructions": n}
            if timed and skip in (0, 1) and j >= skip:
                names, us = timed[j - skip]
                row.update(phases=names, us=us, ns_per_instruction=us * 1e3 / n)
            rows.append(row)
    return rows


def _phase_rows_table(rows):
    out = ["| warpgroup | stretch | PTX instructions | profiled phases | us (median) | ns / instruction |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        timed = (f"{r['phases']} | {r['us']:.2f} | {r['ns_per_instruction']:.1f}" if "us" in r else " | | ")
        out.append(f"| {r['wg']} | {r['stretch']} | {r['instructions']} | {timed} |")
    return "\n".join(out)


def _cubin_table(rows):
    """Markdown: a row per kernel (with warpgroups: their SASS instructions and spill stores / loads)."""
    out = ["| source | kernel | instructions | KiB | registers | spill stores | per warpgroup: SASS (STL / LDL) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['source']} | ptxas failed: {r['error'][:120]!r} | | | | | |")
        else:
            wgs = ", ".join(f"{w['instructions']} ({w['spill_stores']} / {w['spill_loads']})" for w in r.get("warpgroups", []))
            out.append(f"| {r['source']} | {r['kernel']} | {r['instructions']} | {r['bytes'] / 1024:.0f} | "
                       f"{r['registers']} | {r['spill_stores']} | {wgs} |")
    return "\n".join(out)


def _grads_inputs(L: int, B: int, T: int = 2048, H: int = 16, K: int = 128, V: int = 128):
    """(x, do, starts, cot_end): prepared bf16 inputs and 16-bit per-chunk states for the chunk backward."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, HERE)
    from kernels import inputs
    from pallas_kernels.common import prepare
    from pallas_kernels.gpu.mosaic import common as mc

    (q, k, v, beta, g), do = inputs(jax.random.PRNGKey(3), B, T, L, H, K, V)
    x = prepare(q, k, v, beta, g, None, None, mc.CHUNK)
    N = T // mc.CHUNK
    ks = jax.random.split(jax.random.PRNGKey(4), 2)
    starts, cot = ((0.1 * jax.random.normal(kk, (B, H, N, K, V))).astype(jnp.bfloat16) for kk in ks)
    return x, do, starts, cot


def time_rows(L: int, grads: dict, reps: int) -> dict:
    """The chunk backward alone at B * T = 32K, T = 2048: median ms (the saved inverse solved outside)."""
    import jax

    sys.path.insert(0, HERE)
    from kernels import timed
    from pallas_kernels.gpu.mosaic import chunk_grads as cg, common as mc

    x, do, starts, cot = _grads_inputs(L, B=16)
    tv = jax.jit(mc.token_vectors)(x)
    ainv = jax.jit(cg.chunk_inverses)(x)
    fn = jax.jit(lambda x, tv, s, do, c, a: cg.chunk_grads_backward(x, tv, s, do, c, scale=128 ** -0.5, ainv=a,
                                                                     **grads))
    return {"L": L, "grads": grads, "ms": timed(fn, x, tv, starts, do, cot, ainv, reps=reps)}


def _profiled(run, space: int) -> dict:
    """`phase_times` of the trace Mosaic GPU's profiler writes while `run(profile)` runs one profiled
    kernel (profile: the kernel's profiler settings)."""
    import jax

    with tempfile.TemporaryDirectory() as pdir:
        jax.block_until_ready(run({"profile_space": space, "profile_dir": pdir}))
        jax.effects_barrier()
        traces = sorted(glob.glob(os.path.join(pdir, "*.json")))
        if not traces:
            raise RuntimeError("the profiler wrote no trace")
        with open(traces[-1]) as f:
            return phase_times(json.load(f)["traceEvents"])


def profile_rows(L: int, grads: dict) -> dict:
    """The chunk backward once under the in-kernel profiler; `phase_times` of its trace."""
    import jax

    from pallas_kernels.gpu.mosaic import chunk_grads as cg, common as mc

    K = 128
    x, do, starts, cot = _grads_inputs(L, B=1)
    run = lambda profile: jax.jit(lambda x: cg.chunk_grads_backward(
        x, mc.token_vectors(x), starts, do, cot, scale=K ** -0.5, ainv=None, profile=profile, **grads))(x)
    return dict(_profiled(run, 64), L=L, grads=grads)


_KERNEL_NAME = re.compile(rb"([A-Za-z0-9_]+)_mosaic_gpu\b")
# MLIR op families counted per kernel (names without the serialization's "stable_mosaic_gpu." prefix).
MLIR_FAMILIES = {"fma": ("arith.mulf", "arith.addf", "arith.subf"), "shfl": ("nvvm.shfl.sync",),
                 "exp": ("math.exp", "math.exp2"), "asm": ("llvm.inline_asm",), "smem": ("llvm.load", "llvm.store")}


def _operations(root):
    """Every MLIR operation nested in `root` (itself included)."""
    stack = [root]
    while stack:
        op = stack.pop().operation
        yield op
        stack += [o for region in op.regions for block in region for o in block]


def _mosaic_modules(lowered) -> list[bytes]:
    """The serialized MLIR of every Mosaic GPU kernel in a `jax.stages.Lowered`: the `module` entry of
    each custom call's `mhlo.backend_config`."""
    from jax._src.lib.mlir import ir

    blobs = []
    for op in _operations(lowered.compiler_ir("stablehlo").operation):
        if op.name == "stablehlo.custom_call" and "mhlo.backend_config" in op.attributes:
            config = ir.DictAttr(op.attributes["mhlo.backend_config"])
            if "module" in config:
                blobs.append(ir.StringAttr(config["module"]).value_bytes)
    return blobs[::-1]  # program order (the walk pops the last operation first)


def mlir_op_counts(lowered) -> list[dict]:
    """Rows {kernel, ops, families} for every Mosaic GPU kernel of a `jax.stages.Lowered` (lowered for
    CUDA): each kernel's serialized MLIR (before Mosaic GPU's LLVM passes), parsed and walked. A proxy
    for code size that needs no GPU: float32 elementwise ops count once per register vector, so the
    counts scale with the SASS the kernel becomes."""
    from jax._src.interpreters import mlir
    from jax._src.lib import mosaic_gpu_dialect
    from jax._src.lib.mlir import ir

    rows = []
    for blob in _mosaic_modules(lowered):
        names = [n for n in _KERNEL_NAME.findall(blob) if n != b"stable"]
        ctx = mlir.make_ir_context()
        mosaic_gpu_dialect.register_dialect(ctx)
        ctx.allow_unregistered_dialects = True
        counts: dict[str, int] = {}
        with ctx:
            module = ir.Module.parse(blob)  # held: the walk's operations live as long as the module
            for op in _operations(module.operation):
                name = op.name.removeprefix("stable_mosaic_gpu.")
                counts[name] = counts.get(name, 0) + 1
        rows.append({"kernel": names[0].decode() if names else "?", "ops": sum(counts.values()),
                     "families": {f: sum(counts.get(n, 0) for n in ns) for f, ns in MLIR_FAMILIES.items()}})
    return rows


def mlir_rows(L: int, grads: dict) -> list[dict]:
    """`mlir_op_counts` of the whole op's forward and backward (or the peer's: grads {"peer":
    "jla_gdn"}) lowered for CUDA at `_child_ptxas`' shape, on any machine (nothing is compiled)."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, HERE)
    from kernels import gdn_fwd, inputs
    from pallas_kernels import prism_pallas

    K = 128
    (q, k, v, beta, g), do = inputs(jax.random.PRNGKey(0), 2, 1024, L, 4, K, K)
    deviceless = bool(os.environ.get("PRISM_DEVICELESS"))
    if grads.get("peer") == "jla_gdn":
        if L != 1:
            return []  # the peer is Gated DeltaNet: one write
        import jla.ops.mosaic_gpu.scalar_gate as peer_gate

        peer_gate.is_hopper = lambda: True  # lowering only: the peer checks for a Hopper device first
        fwd = gdn_fwd(K ** -0.5)
    else:
        opts = grads.get("mosaic_options", {"grads": grads})
        fwd = lambda q, k, v, beta, g: prism_pallas(q, k, v, beta, g, scale=K ** -0.5, kernel="mosaic",
                                                    platform="gpu", mosaic_options=opts)[0]
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v, beta, g).astype(jnp.float32) * do)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",))
    return [dict(row, L=L, grads=grads) for row in mlir_op_counts(lowered)]


def _mlir_table(rows):
    fams = list(MLIR_FAMILIES)
    out = ["| L | options | kernel | MLIR ops | " + " | ".join(fams) + " |", "|" + "---|" * (4 + len(fams))]
    for r in rows:
        out.append(f"| {r['L']} | {json.dumps(r['grads'])} | {r['kernel']} | {r['ops']} | "
                   + " | ".join(str(r["families"][f]) for f in fams) + " |")
    return "\n".join(out)


def _ptxas_table(rows):
    out = ["| L | grads options | kernel | registers | spill stores / loads B | wgmma serialized |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['L']} | {json.dumps(r['grads'])} | {r['kernel']} | {r.get('registers')} | "
                   f"{r.get('spill_stores')} / {r.get('spill_loads')} | {'yes' if r['wgmma_serialized'] else ''} |")
    return "\n".join(out)


def _intra_inputs(L: int):
    """(x, tv): prepared bf16 inputs at the benchmark shape (B * T = 32K, T = 2048, H = 16, K = V = 128)."""
    import jax

    from pallas_kernels.gpu.mosaic import common as mc

    x = _grads_inputs(L, B=16)[0]
    return x, jax.jit(mc.token_vectors)(x)


def intra_time_rows(L: int, opts: dict, reps: int) -> dict:
    """The intra kernel alone at the benchmark shape: median ms."""
    import jax

    sys.path.insert(0, HERE)
    from kernels import timed
    from pallas_kernels.gpu.mosaic.intra import intra

    x, tv = _intra_inputs(L)
    fn = jax.jit(lambda x, tv: intra(x, tv, **opts))
    return {"L": L, "grads": opts, "kernel": "intra", "ms": timed(fn, x, tv, reps=reps)}


def intra_profile_rows(L: int, opts: dict) -> dict:
    """The intra kernel once under the in-kernel profiler at the benchmark shape; `phase_times`."""
    import jax

    from pallas_kernels.gpu.mosaic.intra import intra

    x, tv = _intra_inputs(L)
    run = lambda profile: jax.jit(lambda x, tv: intra(x, tv, profile=profile, **opts))(x, tv)
    return dict(_profiled(run, 128), L=L, grads=opts, kernel="intra")


def _profile_table(res):
    out = [f"L = {res['L']}, options {json.dumps(res['grads'])}: {res['ctas']} CTAs, per CTA "
           f"{res['cta_us'][0]:.2f} us (median)", "", "| phase | median us | mean us | max us |", "|---|---|---|---|"]
    out += [f"| {n} | {a:.2f} | {b:.2f} | {c:.2f} |" for n, (a, b, c) in res["phases"].items()]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["ptxas", "sass", "ptx", "cubin", "phases", "mlir", "profile", "time"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--writes", default="1,2")
    ap.add_argument("--kernel", choices=["grads", "intra"], default="grads",
                    help="the chunk backward (default) or the intra kernel (profile, time)")
    ap.add_argument("--grads", "--opts", dest="grads", action="append", default=[], metavar="JSON",
                    help="the kernel's options (for grads: mosaic_options['grads']); repeatable")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ptx", default=None, help="cubin: the folder `ptx` wrote")
    ap.add_argument("--deviceless", action="store_true",
                    help="ptxas, ptx: compile for an H100 without one (benchmarks/deviceless.py: the CUDA plugin, ptxas)")
    ap.add_argument("--ptxas", default="ptxas", help="cubin: the ptxas binary")
    ap.add_argument("--nvdisasm", default=None,
                    help="cubin: an nvdisasm binary (pip wheel nvidia-cuda-nvdisasm): SASS and spills per warpgroup")
    ap.add_argument("--profile", default=None, help="phases: a `profile` run's mosaic_diag.json (its first row)")
    ap.add_argument("--sweep-registers", action="store_true",
                    help="cubin: also assemble each three-warpgroup kernel at every setmaxnreg budget summing to 504")
    args = ap.parse_args(argv)
    if args.mode == "phases":
        if not args.ptx or not os.path.isfile(args.ptx):
            ap.error("phases needs --ptx FILE (one kernel's PTX, .ptx or .ptx.gz)")
        phases = None
        if args.profile:
            with open(args.profile) as f:
                phases = next(r["phases"] for r in json.load(f)["rows"] if "phases" in r)
        rows = phase_rows(_read_text(args.ptx), phases)
        print(_phase_rows_table(rows), flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "mosaic_diag_phases.json"), "w") as f:
            json.dump({"mode": "phases", "ptx": args.ptx, "profile": args.profile, "rows": rows}, f, indent=1)
        return
    if args.mode == "cubin":
        if not args.ptx:
            ap.error("cubin needs --ptx DIR (the folder the `ptx` mode wrote)")
        rows = cubin_rows(args.ptx, args.ptxas, nvdisasm=args.nvdisasm)
        print(_cubin_table(rows), flush=True)
        report = {"mode": "cubin", "rows": rows, "register_sweeps": {}}
        for path in sorted(glob.glob(os.path.join(args.ptx, "**", "*.ptx*"), recursive=True)) if args.sweep_registers else []:
            if not path.endswith((".ptx", ".ptx.gz")):
                continue
            ptx = _read_text(path)
            if len(_SETMAXNREG.findall(ptx)) != 3:
                continue
            sweep = register_sweep(ptx, args.ptxas)
            report["register_sweeps"][os.path.relpath(path, args.ptx)] = sweep
            clean = [r["budget"] for r in sweep
                     if "error" not in r and not r["wgmma_serialized"] and not r["spill_stores"]]
            print(f"\n{os.path.relpath(path, args.ptx)}: {len(sweep)} budgets summing to 504; without spills or "
                  f"serialized wgmmas ({len(clean)}): {clean}", flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "mosaic_diag_cubin.json"), "w") as f:
            json.dump(report, f, indent=1)
        return
    grads_list = [json.loads(g) for g in args.grads] or [{}]
    report = {"mode": args.mode, "rows": []}
    os.makedirs(args.out, exist_ok=True)
    for L in (int(w) for w in args.writes.split(",")):
        for grads in grads_list:
            try:
                if args.mode == "ptxas":
                    rows = ptxas_rows(L, grads, deviceless=args.deviceless)
                    report["rows"] += rows
                    print(_ptxas_table(rows), flush=True)
                elif args.mode == "mlir":
                    rows = mlir_rows(L, grads)
                    report["rows"] += rows
                    print(_mlir_table(rows), flush=True)
                elif args.mode == "ptx":
                    rows = ptx_rows(L, grads, args.out, deviceless=args.deviceless)
                    report["rows"] += rows
                    print("\n".join(f"{r['file']}" for r in rows), flush=True)
                elif args.mode == "sass":
                    rows = sass_rows(L, grads, args.out)
                    report["rows"] += rows
                    print(_sass_table(rows), flush=True)
                elif args.mode == "time":
                    res = (intra_time_rows if args.kernel == "intra" else time_rows)(L, grads, args.reps)
                    report["rows"].append(res)
                    print(f"| {L} | {json.dumps(grads)} | {res['ms']:.3f} |", flush=True)
                else:
                    res = (intra_profile_rows if args.kernel == "intra" else profile_rows)(L, grads)
                    report["rows"].append(res)
                    print(_profile_table(res), flush=True)
            except Exception as e:  # one failing configuration does not stop the others
                report["rows"].append({"L": L, "grads": grads, "error": repr(e)[:2000]})
                print(f"L = {L}, grads {json.dumps(grads)}: FAILED {repr(e)[:500]}", flush=True)
            with open(os.path.join(args.out, "mosaic_diag.json"), "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_child":
        _child_ptxas(int(sys.argv[2]), json.loads(sys.argv[3]))
    else:
        main()
