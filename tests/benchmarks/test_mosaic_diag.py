"""The parsers of benchmarks/mosaic_diag.py (the script itself needs a Hopper GPU)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("mosaic_diag", ROOT / "benchmarks" / "mosaic_diag.py")
diag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diag)

# ptxas -v output as Mosaic GPU printed it on the H100 (two kernels of the op, abridged).
PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'prism_mosaic_state_pullback_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for prism_mosaic_state_pullback_mosaic_gpu_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 218 registers, used 2 barriers, 1 bytes smem
ptxas info    : Compile time = 812.000 ms
ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the function 'prism_chunk_grads_mgpu_mosaic_gpu_kernel'
ptxas warning : Registers are spilled to local memory in function 'prism_chunk_grads_mgpu_mosaic_gpu_kernel', 996 bytes spill stores, 1168 bytes spill loads
ptxas info    : Compiling entry function 'prism_chunk_grads_mgpu_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for prism_chunk_grads_mgpu_mosaic_gpu_kernel
    856 bytes stack frame, 996 bytes spill stores, 1168 bytes spill loads
ptxas info    : Used 255 registers, used 2 barriers, 856 bytes cumulative stack size, 1 bytes smem
"""


def test_parse_ptxas_gives_a_row_per_kernel():
    rows = diag.parse_ptxas(PTXAS)
    assert rows == [
        {"kernel": "prism_mosaic_state_pullback", "stack": 0, "spill_stores": 0, "spill_loads": 0,
         "registers": 218, "wgmma_serialized": False},
        {"kernel": "prism_chunk_grads_mgpu", "stack": 856, "spill_stores": 996, "spill_loads": 1168,
         "registers": 255, "wgmma_serialized": True}]
    assert diag.parse_ptxas("nothing compiled\n") == []


def test_phase_times_per_cta():
    # Two CTAs (tids), two phases each: "loads" 2 and 4 us, "block" 6 and 10 us.
    events = []
    for tid, (t0, loads, block) in enumerate([(100.0, 2.0, 6.0), (101.0, 4.0, 10.0)]):
        events += [{"tid": tid, "name": "loads", "ph": "B", "ts": t0},
                   {"tid": tid, "name": "loads", "ph": "E", "ts": t0 + loads},
                   {"tid": tid, "name": "block", "ph": "B", "ts": t0 + loads},
                   {"tid": tid, "name": "block", "ph": "E", "ts": t0 + loads + block}]
    res = diag.phase_times(events)
    assert res["ctas"] == 2
    assert list(res["phases"]) == ["loads", "block"]
    assert res["phases"]["loads"] == pytest.approx((3.0, 3.0, 4.0))
    assert res["phases"]["block"] == pytest.approx((8.0, 8.0, 10.0))
    assert res["cta_us"] == pytest.approx((11.0, 11.0, 14.0))


# cuobjdump -sass as Mosaic GPU dumps it (two kernels, abridged).
SASS = """\
	code for sm_90a
		Function : prism_mosaic_state_mosaic_gpu_kernel
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                         /* 0x00000a00ff017b82 */
        /*0010*/                   STL [R1+0x4], R2 ;                             /* 0x0000040201007387 */
        /*0020*/              @!P0 BRA 0x90 ;                                     /* 0x0000000000008947 */
        /*0030*/                   MUFU.EX2 R3, R4 ;                              /* 0x0000000400037308 */
		Function : gdr_chunk_grads_mosaic_gpu_kernel
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;  /* 0x00000000041879f0 */
        /*0010*/                   SHFL.BFLY PT, R5, R6, 0x1, 0x1f ;              /* 0x0c201f0006057f89 */
        /*0020*/                   LDS.128 R8, [R2] ;                              /* 0x0000000002087984 */
"""


def test_count_sass_counts_instructions_and_families_per_kernel():
    rows = diag.count_sass(SASS)
    assert [r["kernel"] for r in rows] == ["prism_mosaic_state", "gdr_chunk_grads"]
    assert [r["instructions"] for r in rows] == [4, 3]
    assert rows[0]["ops"] == {"other": 1, "spill": 1, "branch": 1, "mufu": 1}
    assert rows[1]["ops"] == {"wgmma": 1, "shfl": 1, "smem": 1}
    table = diag._sass_table([dict(r, L=1) for r in rows])
    assert "| 1 | prism_mosaic_state | 4 |" in table


def _lowered_scale_kernel(n_muls):
    """A `Lowered` holding one Mosaic GPU kernel that multiplies a [64, 64] tile n_muls times."""
    import jax
    import jax.numpy as jnp
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from pallas_kernels.gpu.mosaic import common as mc

    def body(x_ref, o_ref, x_s, bar):
        plgpu.copy_gmem_to_smem(x_ref, x_s, bar)
        plgpu.barrier_wait(bar)
        y = plgpu.load(x_s, layout=mc.WGMMA)
        for i in range(n_muls):
            y = y * (1.5 + i)
        o_ref[...] = y

    kern = mc.kernel(body, name=f"diag_scale_{n_muls}", out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32),
                     scratch=dict(x_s=plgpu.SMEM((64, 64), jnp.float32), bar=plgpu.Barrier(num_arrivals=1)),
                     grid=(1,), grid_names=("g",))
    x = jnp.ones((64, 64), jnp.float32)
    return jax.jit(kern).trace(x).lower(lowering_platforms=("cuda",))


def test_mlir_op_counts_names_the_kernel_and_grows_with_its_work():
    few, many = (diag.mlir_op_counts(_lowered_scale_kernel(n)) for n in (1, 9))
    assert [r["kernel"] for r in few] == ["diag_scale_1"] and [r["kernel"] for r in many] == ["diag_scale_9"]
    assert many[0]["families"]["fma"] > few[0]["families"]["fma"] > 0
    assert many[0]["ops"] > few[0]["ops"] > 100
    import jax

    assert diag.mlir_op_counts(jax.jit(lambda x: 2 * x).trace(1.0).lower(lowering_platforms=("cuda",))) == []


def test_ptx_modules_splits_a_log_into_modules_and_drops_the_text_between():
    module = (".version 8.0\n.target sm_90a\n.address_size 64\n\n.visible .entry {name}_mosaic_gpu_kernel()\n"
              "{{\n  ret;\n}}\n")
    log = "I1207 compiling\n" + module.format(name="a") + "I1207 ptxas done\n" + module.format(name="b") + "tail\n"
    got = diag.ptx_modules(log)
    assert len(got) == 2
    assert all(m.startswith(".version 8.0") and m.endswith("}\n") for m in got)
    assert "a_mosaic_gpu_kernel" in got[0] and "b_mosaic_gpu_kernel" in got[1]
    assert "ptxas done" not in got[0] and "tail" not in got[1]


def test_with_budgets_sets_each_setmaxnreg_as_the_kernel_would_emit_it():
    ptx = ("  setmaxnreg.dec.sync.aligned.u32 152;\n  add.f32 %f1, %f2, %f3;\n"
           "  setmaxnreg.inc.sync.aligned.u32 208;\n  setmaxnreg.dec.sync.aligned.u32 144;\n")
    got = diag.with_budgets(ptx, (176, 160, 168))
    assert diag._SETMAXNREG.findall(got) == ["setmaxnreg.inc.sync.aligned.u32 176", "setmaxnreg.dec.sync.aligned.u32 160",
                                             "setmaxnreg.dec.sync.aligned.u32 168"]
    assert "add.f32 %f1, %f2, %f3;" in got


def test_deviceless_h100_is_a_compile_only_device_or_names_what_is_missing():
    """benchmarks/deviceless.py: with the CUDA plugin a compile-only H100, without it a RuntimeError that says
    which packages to install."""
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import deviceless

    deviceless.h100.cache_clear()
    if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda13") is None:
        with pytest.raises(RuntimeError, match="jax-cuda13-plugin"):
            deviceless.h100()
    else:
        assert deviceless.h100().device_kind == "NVIDIA H100 80GB HBM3"


def _wait():
    return ["\t{", "\tLAB_WAIT:", "\tmbarrier.try_wait.parity.shared.b64 P1, [%r1], %r2;", "\t@P1 bra DONE;",
            "\tbra.uni     LAB_WAIT;", "\tDONE:", "\t}"]


def _work(n):
    return [f"\tadd.f32 %f{i}, %f{i}, %f{i};" for i in range(n)] + ["\t// a comment", ""]


def test_ptx_segments_cut_warpgroups_at_their_waits():
    ptx = "\n".join(["\tmov.u32 %r1, %tid.x;", "\t@%p1 bra \t$L__BB0_2;", *_work(40), *_wait(), *_work(50),
                     *_wait(), *_wait(), *_work(35), "$L__BB0_2:", "\t@%p2 bra \t$L__BB0_4;", *_wait(), *_work(60),
                     "$L__BB0_4:", "\t@%p3 bra \t$L__BB0_6;", *_work(99), "$L__BB0_6:", "\tret;"])
    # The third branch has no wait: not a warpgroup of the dataflow. Between two waits in a row: dropped.
    # Each wait loop counts two instructions (try_wait, the predicated branch) into the stretch before it.
    assert diag.ptx_segments(ptx) == [[42, 52, 35], [60]]
    phases = {"Init": (1.0, 1.0, 1.0), "w0.wait_loads": (2.0, 2.0, 2.0), "w0.a": (3.0, 3.0, 3.0),
              "w0.b": (1.0, 1.0, 1.0), "w0.wait_x": (0.5, 0.5, 0.5), "w0.c": (2.6, 2.6, 2.6),
              "w1.wait_loads": (1.0, 1.0, 1.0), "w1.d": (6.0, 6.0, 6.0)}
    assert diag.profile_groups(phases) == [[("a+b", 4.0), ("c", 2.6)], [("d", 6.0)]]
    rows = diag.phase_rows(ptx, phases)
    # Warpgroup 0 has one stretch more than work runs: its first (issuing copies) is untimed.
    assert [r.get("phases") for r in rows] == [None, "a+b", "c", "d"]
    assert rows[1]["ns_per_instruction"] == pytest.approx(4000 / 52)
    assert rows[3]["ns_per_instruction"] == pytest.approx(100.0)


def test_sass_warpgroups_cut_at_each_register_budget_move():
    sass = "\n".join([
        "        /*0000*/                   LDC R1, c[0x0][0x28] ;",
        "        /*0010*/              @P2 BRA `(.L_x_0) ;",
        "        /*0020*/                   USETMAXREG.DEALLOC.CTAPOOL 0x98 ;",
        "        /*0030*/                   FFMA R2, R3, R4, R2 ;",
        "        /*0040*/                   STL [R1+0xec], R103                     (*\"SpillRefill\"*);",
        "        /*0050*/                   LDL.LU R103, [R1+0xec]                  (*\"SpillRefill\"*);",
        ".L_x_0:",
        "        /*0060*/                   USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xd0 ;",
        "        /*0070*/              @!P1 BRA `(.L_x_1) ;",
        "        /*0080*/                   STL.64 [R1+0x58], R10                   (*\"SpillRefill\"*);"])
    assert diag.sass_warpgroups(sass) == [{"instructions": 4, "spill_stores": 1, "spill_loads": 1},
                                          {"instructions": 3, "spill_stores": 1, "spill_loads": 0}]
    assert diag.sass_warpgroups("        /*0000*/    FFMA R2, R3, R4, R2 ;") == []
    table = diag._cubin_table([{"source": "a.ptx", "kernel": "k", "instructions": 7, "bytes": 112, "registers": 168,
                                "spill_stores": 12, "warpgroups": diag.sass_warpgroups(sass)}])
    assert table.splitlines()[-1] == "| a.ptx | k | 7 | 0 | 168 | 12 | 4 (1 / 1), 3 (1 / 0) |"
