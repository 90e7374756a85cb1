"""benchmarks/run_recovery.py: each recipe config parses through HfArgumentParser into the stages the old shell scripts
ran (conversion, arms, evaluation, report); bad configs are refused. The training itself is not run here."""

import glob
import importlib.util
import os

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "recovery-*.yaml")))


@pytest.fixture(scope="module")
def recovery():
    spec = importlib.util.spec_from_file_location("run_recovery", os.path.join(ROOT, "benchmarks", "run_recovery.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_every_recipe_config_parses(recovery):
    assert {os.path.basename(path) for path in CONFIGS} >= {"recovery-tiny-en-93.yaml", "recovery-tiny-en-90.yaml"}
    for path in CONFIGS:
        args = recovery.parse_arguments([path])
        assert isinstance(args, recovery.RecoveryArguments) and args.output_dir.startswith("outputs/")


def test_93_recipe_stages(recovery):
    """The -93.2% recipe: self 352 output-aware, full-width shared cross latent over 3 frames, 150 long-form steps."""
    args = recovery.parse_arguments([os.path.join(ROOT, "configs", "recovery-tiny-en-93.yaml")])
    convert = recovery.conversion_command(args, "TINY", "train.json")
    assert (flag(convert, "--kv_lora_rank"), flag(convert, "--kept_key_dims"), flag(convert, "--cross_kv_lora_rank"),
            flag(convert, "--cross_latent_stride"), flag(convert, "--output_aware")) == ("352", "0", "384", "3",
                                                                                         "decoder_self")
    assert flag(convert, "--calibration_data") == "train.json" and flag(convert, "--calibration_samples") == "256"
    svd, random = (recovery.arm_stages(args, arm) for arm in ("mla-svd", "mla-random"))
    assert [stage[1] for stage in svd] == ["outputs/recovery93s3/mla-svd"]  # no short-clip stage (steps 0)
    start, output, steps, learning_rate, extra = random[0]
    assert (start, steps, learning_rate) == ("outputs/recovery93s3/init", 150, pytest.approx(5e-5))
    assert "--mla_from_scratch" in extra and "--concatenate_timestamps" in extra
    train = recovery.finetune_command(args, start, output, steps, learning_rate, "TINY", ["train.json"], extra)
    assert (flag(train, "--trainable"), flag(train, "--max_steps"), flag(train, "--learning_rate")) == ("mla", "150",
                                                                                                         "5e-05")
    assert '"num_decay_steps": 50' in flag(train, "--lr_scheduler_kwargs") and "--max_train_minutes" not in train
    assert list(recovery.scored_models(args, "TINY")) == ["mha", "init", "mla-svd", "mla-random"]
    report = recovery.report_command(args)
    assert (flag(report, "--steps"), flag(report, "--long_steps"), flag(report, "--cross_stride")) == ("0", "150", "3")


def test_90_recipe_stages(recovery):
    """The -90.6% recipe: per-layer latents of 48 + 4 kept dims, 950 short-clip steps capped at 28 minutes."""
    args = recovery.parse_arguments([os.path.join(ROOT, "configs", "recovery-tiny-en-90.yaml")])
    convert = recovery.conversion_command(args, "TINY", "train.json")
    assert flag(convert, "--cross_attention_latent") == "per_layer" and "--cross_kv_lora_rank" not in convert
    (stage,) = recovery.arm_stages(args, "mla-svd")
    start, output, steps, learning_rate, extra = stage
    assert (output, steps, learning_rate, flag(extra, "--max_train_samples")) == ("outputs/recovery/mla-svd", 950,
                                                                                  1e-3, "544")
    train = recovery.finetune_command(args, start, output, steps, learning_rate, "TINY", ["a.json", "b.json"], extra)
    assert '"num_decay_steps": 250' in flag(train, "--lr_scheduler_kwargs")
    assert flag(train, "--max_train_minutes") == "28" and flag(train, "--save_total_limit") == "2"
    assert train[train.index("--train_data") + 1: train.index("--train_data") + 3] == ["a.json", "b.json"]
    assert list(recovery.scored_models(args, "TINY")) == ["mla-svd"]
    assert args.eval_cache == ["float", "int8"] and args.report is False


def test_flags_override_the_config_and_bad_configs_are_refused(recovery, tmp_path):
    path = os.path.join(ROOT, "configs", "recovery-tiny-en-93.yaml")
    args = recovery.parse_arguments([path, "--long_steps", "50", "--output_dir", "outputs/try"])
    assert (args.long_steps, args.output_dir, args.kv_lora_rank) == (50, "outputs/try", 352)
    typo = tmp_path / "typo.yaml"
    typo.write_text("kv_lora_rnk: 96\n")
    with pytest.raises(ValueError, match="kv_lora_rnk"):
        recovery.parse_arguments([str(typo)])
    with pytest.raises(ValueError, match="kv_lora_rnk"):
        recovery.parse_arguments([str(typo), "--steps", "10"])
    with pytest.raises(ValueError, match="nothing would train"):
        recovery.parse_arguments([path, "--long_steps", "0"])
    with pytest.raises(ValueError, match="mla-sdv"):
        recovery.parse_arguments([path, "--arms", "mla-sdv"])
