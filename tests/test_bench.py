"""bench/: `bench/run.py --quick` writes a BENCHMARKS file with every section, and the padding accounting is right.

Figures are never asserted (they depend on the machine); the shape of the file and the FLOP arithmetic are.
"""

import subprocess
import sys
import types

import pytest
import torch

from bench import padding, run
from internvl_chat.data.packing import PackedCollator
from tests.conftest import REPO

SECTIONS = ("data", "padding", "training", "generation", "changes")


# --- padding accounting on hand-made batches -------------------------------------------------------------------


def test_equal_lengths_waste_nothing():
    work = padding.batch_work([[5], [5]], packed=False)
    assert (work.mlp_share, work.dense_share, work.varlen_share, work.llm_share(), work.llm_share(True)) == (1,) * 5
    assert (work.rows, work.steps, work.real_tokens) == (2, 1, 10)


def test_padded_batch_shares():
    work = padding.batch_work([[1], [3]], packed=False)  # width 3: tokens 4 of 6, pairs 1 + 9 of 2 x 9
    assert work.mlp_share == pytest.approx(4 / 6)
    assert work.dense_share == pytest.approx(10 / 18)
    assert work.varlen_share == 1  # flash-attention unpads a padded batch
    real = 4 * padding.LINEAR_FLOPS_PER_TOKEN + 10 * padding.ATTENTION_FLOPS_PER_PAIR / 2
    computed = 6 * padding.LINEAR_FLOPS_PER_TOKEN + 10 * padding.ATTENTION_FLOPS_PER_PAIR / 2
    assert work.llm_share() == pytest.approx(real / computed)
    dense = 6 * padding.LINEAR_FLOPS_PER_TOKEN + 18 * padding.ATTENTION_FLOPS_PER_PAIR / 2
    assert work.llm_share(dense=True) == pytest.approx(real / dense)


def test_packed_batch_shares():
    # row 0 packs 1 + 3 tokens, row 1 holds 2 and a padding tail of 2 (one piece: the longest sample is 3)
    work = padding.batch_work([[1, 3], [2]], packed=True)
    assert work.mlp_share == pytest.approx(6 / 8)
    assert work.dense_share == pytest.approx((1 + 9 + 4) / (2 * 16))
    assert work.varlen_share == pytest.approx((1 + 9 + 4) / (1 + 9 + 4 + 4))


@pytest.mark.parametrize("rows", [[[2, 2, 2], [2]], [[1], [1], [4]], [[3, 5, 1], [7], [2, 2]]])
def test_packed_segments_are_the_collators(rows):
    """The flash-attention segments counted are the ones PackedCollator hands to flash-attention."""
    packs = [[{"input_ids": torch.ones(n, dtype=torch.long), "labels": torch.ones(n, dtype=torch.long),
               "pixel_values": torch.zeros(1, 3, 2, 2), "image_flags": torch.zeros(1)} for n in row] for row in rows]
    batch = PackedCollator(pad_token_id=0)(packs)
    segments = batch["cu_seq_lens_q"].diff()
    assert padding.batch_work(rows, packed=True).varlen_pairs == int((segments ** 2).sum())
    assert padding.batch_work(rows, packed=True).computed_tokens == batch["input_ids"].numel()


def test_every_strategy_sees_every_token_once():
    samples = padding.make_mix(300, seed=1)
    assert {s.kind for s in samples} == set(padding.MIX)
    assert max(s.tokens for s in samples) <= padding.MAX_SEQ_LENGTH
    total = sum(s.tokens for s in samples)
    works = padding.strategies(samples, batch_size=4)
    assert set(works) == {"padding", "grouped", "packing", "packing + grouped"}
    for work in works.values():
        assert work.real_tokens == total
        assert 0 < work.mlp_share <= 1 and 0 < work.dense_share <= 1 and 0 < work.varlen_share <= 1
    assert works["padding"].steps == 75  # 300 samples, batches of 4
    assert works["packing"].steps < works["padding"].steps  # several samples per row
    assert works["grouped"].mlp_share > works["padding"].mlp_share


# --- the orchestrator, in process, on stand-in sections ---------------------------------------------------------


@pytest.fixture
def fake_sections(monkeypatch):
    good = types.ModuleType("bench_fake_good")

    def good_section(quick=False, device="cpu"):
        torch.set_num_threads(1)  # as a one-core benchmark does: the runner gives the next section all of them back
        return (f"## Fake on {device}\n\ntext\n\n```\n# a comment, not a heading\n```\n"
                f"<!-- headline: fake is {device} -->\n")

    good.section = good_section
    broken = types.ModuleType("bench_fake_broken")

    def section(quick=False, device="cpu"):
        raise RuntimeError("no luck")

    broken.section = section
    monkeypatch.setitem(sys.modules, "bench_fake_good", good)
    monkeypatch.setitem(sys.modules, "bench_fake_broken", broken)
    monkeypatch.setattr(run, "SECTIONS", {"good": ("bench_fake_good", "Good"), "broken": ("bench_fake_broken", "Bad")})


def test_failed_section_is_written_and_exits_1(fake_sections, tmp_path):
    out = tmp_path / "B.md"
    threads = torch.get_num_threads()
    assert run.main(["--out", str(out)]) == 1
    assert torch.get_num_threads() == threads
    text = out.read_text()
    assert "## Fake on cpu" in text and "- fake is cpu" in text
    assert f"## Bad\n\n{run.FAILED} `RuntimeError: no luck`" in text
    assert "- [Bad](#bad)" in text and "- Commit: `" in text and "- Machine: " in text
    assert run.main(["--only", "good", "--out", str(out)]) == 0
    assert run.FAILED not in out.read_text()


def test_gpu_part_is_replaced_and_kept(fake_sections, tmp_path):
    out = tmp_path / "B.md"
    run.write(out, [run.run_section("good", True, "cpu")[0]], True, "cpu", [])
    for _ in range(2):  # a second GPU run replaces the first
        run.write(out, [run.run_section("good", True, "cuda")[0]], True, "cuda", [])
    text = out.read_text()
    assert text.count(run.GPU_BEGIN) == 1 and text.index("## Fake on cpu") < text.index(run.GPU_BEGIN)
    assert "### Fake on cuda" in text and "\n# a comment, not a heading\n" in text  # demoted outside code only
    assert "  - [Fake on cuda](#fake-on-cuda)" in text
    run.write(out, [run.run_section("good", True, "cpu")[0]], True, "cpu", [])  # a CPU re-run keeps the GPU part
    assert out.read_text().count("### Fake on cuda") == 1


# --- the real thing, once -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, "bench/run.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks")
    assert "- Commit: `" in text and "- Machine: " in text and "## Headlines" in text
    for name in SECTIONS:
        marker = f"<!-- section: {name} -->\n## "
        assert marker in text, f"section {name} missing"
    assert run.FAILED not in text
    for name in SECTIONS:
        assert f"[bench] {name}: done" in proc.stderr
