"""benchmarks/distill_gap.py: KL(teacher || student) per set and speaker on the teacher's own transcripts."""

import json
import subprocess
import sys

import pytest

from tests.helpers import write_clips, write_manifest


pytestmark = pytest.mark.usefixtures("one_thread")


def run_gap(student, teacher, data, output_file):
    return subprocess.run([sys.executable, "benchmarks/distill_gap.py", "--model_name_or_path", student,
                           "--teacher_model_name_or_path", teacher, "--data", *data, "--output_file", str(output_file),
                           "--max_new_tokens", "8", "--batch_size", "2"], capture_output=True, text=True)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two manifests: three clips of two speakers, and two clips with no speaker."""
    root = tmp_path_factory.mktemp("gap")
    paths = write_clips(root, ["a", "b", "c", "d", "e"], manifest=None)
    first = write_manifest(root / "first.json", [{"path": p, "speaker": s} for p, s in zip(paths, "xyx")])
    second = write_manifest(root / "second.json", [{"path": p} for p in paths[3:]])
    return first, second


def test_teacher_against_itself_is_zero(tiny_checkpoint_dirs, two_sets, tmp_path):
    mha_dir, _ = tiny_checkpoint_dirs
    result = run_gap(mha_dir, mha_dir, two_sets, tmp_path / "gap.json")
    assert result.returncode == 0, result.stderr
    sets = json.loads((tmp_path / "gap.json").read_text())["sets"]
    assert [s["clips"] for s in sets] == [3, 2]
    assert sorted(sets[0]["speakers"]) == ["x", "y"] and list(sets[1]["speakers"]) == ["-"]
    assert sets[0]["speakers"]["x"]["clips"] == 2
    for s in sets:
        assert s["tokens"] == sum(v["tokens"] for v in s["speakers"].values()) > 0
        assert s["kl"] == pytest.approx(0.0, abs=1e-9)  # the same logits
    assert "| set | clips | tokens |" in result.stdout


def test_lossy_student_is_measured_per_speaker(tiny_checkpoint_dirs, two_sets, tmp_path):
    mha_dir, mla_dir = tiny_checkpoint_dirs  # rank 8 of d_model 16: lossy
    result = run_gap(mla_dir, mha_dir, two_sets[:1], tmp_path / "gap.json")
    assert result.returncode == 0, result.stderr
    (gap,) = json.loads((tmp_path / "gap.json").read_text())["sets"]
    assert gap["kl"] > 1e-6  # random tiny models predict near-uniformly: small, but far from the 0 above
    speakers = gap["speakers"].values()
    # the set's figure is the token-weighted mean of its speakers'
    assert gap["kl"] == pytest.approx(sum(v["kl"] * v["tokens"] for v in speakers) / gap["tokens"], rel=1e-5)
