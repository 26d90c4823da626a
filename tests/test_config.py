import pytest
import yaml

from kdforge.config import ConfigError, load_config, parse_override, save_config, to_dict

PRESET = "configs/supervised/digits_cpu.yaml"


def test_overrides_are_applied_and_typed(digits_root):
    cfg = load_config(PRESET, [f"data.root={digits_root}", "optim.lr=0.01", "train.epochs=3", "optim.ref_batch=256"])
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3 and cfg.optim.ref_batch == 256
    assert cfg.method_name == "supervised"


def test_base_inheritance_merges_sections(digits_root):
    cfg = load_config("configs/kd/digits_cpu.yaml", [f"data.root={digits_root}", "teacher.checkpoint=null"])
    assert cfg.method_name == "kd" and cfg.model.name == "kdf_vit_micro"
    assert cfg.data.img_size == 32  # inherited from the supervised preset
    assert cfg.optim.name == "adamw"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "optim.lrr: unknown key; did you mean 'lr'?"),
    ("optim.lr=-1", "optim.lr: expected a positive number, got -1.0"),
    ("data.batch_size=0", "data.batch_size: expected a positive integer, got 0"),
    ("data.batch_size=abc", "data.batch_size: expected an integer, got 'abc'"),
    ("train.amp=fp8", "train.amp: expected one of 'none' | 'bf16' | 'fp16', got 'fp8'"),
    ("method.temperature=2", "method.temperature: unknown key"),
    ("method.name=nosuch", "method.name: unknown method 'nosuch'"),
    ("train.device=tpu", "train.device: expected auto | cpu | cuda | cuda:N"),
    ("sched.milestones=[30,10]", "sched.milestones: expected increasing epochs"),
])
def test_bad_values_fail_with_one_line_naming_the_key(digits_root, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(PRESET, [f"data.root={digits_root}", override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_method_keys_are_validated_by_the_method(digits_root):
    with pytest.raises(ConfigError, match="method.alpha: expected a number in"):
        load_config("configs/kd/digits_cpu.yaml", [f"data.root={digits_root}", "teacher.checkpoint=null",
                                                     "method.alpha=1.5"])


def test_missing_data_folder_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="data.root: folder .* does not exist; create it"):
        load_config(PRESET, [f"data.root={tmp_path / 'nope'}"])
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="data.train_split: .* is not a folder"):
        load_config(PRESET, [f"data.root={tmp_path / 'd'}"])


def test_missing_preset_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("optim.lr")


def test_saved_config_round_trips(digits_root, tmp_path):
    cfg = load_config(PRESET, [f"data.root={digits_root}", "optim.lr=0.02"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["optim"]["lr"] == 0.02


def test_optional_section_error_names_the_inner_problem(tmp_path):
    """A bad value inside an optional section (teacher: ModelConfig | null) reports the inner key and
    what is wrong with it, not just 'expected ModelConfig | null'."""
    from kdforge.config import ConfigError, load_config
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: {name: kd}\nmodel: {name: kdf_resnet_narrow}\n"
                   f"teacher: {{name: kdf_resnet_wide, checkpoint: {tmp_path / 'nope'}}}\n"
                   f"data: {{root: {tmp_path}, require_root: false}}\n")
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint: expected an existing file or run folder"):
        load_config(str(cfg), [])


def test_model_kwargs_yaml_colon_pitfall_is_an_error(tmp_path):
    """{patch_size:8} (no space) is YAML for {'patch_size:8': None}, which timm would silently drop."""
    from kdforge.config import ConfigError, load_config
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: kdf_vit_micro}}\ndata: {{root: {tmp_path}, require_root: false}}\n")
    with pytest.raises(ConfigError, match=r"model\.kwargs: 'patch_size:8' is not a constructor argument name.*"
                                          r"\{patch_size: 8\}"):
        load_config(str(cfg), ["model.kwargs={patch_size:8}"])
    assert load_config(str(cfg), ["model.kwargs={patch_size: 8}"]).model.kwargs == {"patch_size": 8}


def test_model_kwargs_that_other_keys_set_are_an_error(tmp_path):
    """model.kwargs={img_size: 32} duplicated data.img_size and crashed with a TypeError in the trainer."""
    from kdforge.config import ConfigError, load_config
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: kdf_vit_micro}}\ndata: {{root: {tmp_path}, require_root: false}}\n")
    with pytest.raises(ConfigError, match=r"model\.kwargs: 'img_size' is set by data\.img_size"):
        load_config(str(cfg), ["model.kwargs={img_size: 32, patch_size: 4}"])
    with pytest.raises(ConfigError, match=r"model\.kwargs: 'num_classes' is set by model\.num_classes"):
        load_config(str(cfg), ["model.kwargs={num_classes: 3}"])
