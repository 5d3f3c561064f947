"""Configuration: defaults, files, overrides and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config import AppConfig, ConfigError, default_config_text, load_config


def test_defaults_load_and_document_every_key() -> None:
    config = load_config()
    assert config.preprocess.target_shape == (64, 64, 56)
    assert config.model.device == "auto"
    text = default_config_text()
    data = yaml.safe_load(text)
    # every schema field appears in default.yaml, and every line that sets a key carries a comment
    for section, field in AppConfig.model_fields.items():
        assert section in data, f"section {section} missing from default.yaml"
        sub = getattr(field.annotation, "model_fields", None)
        if sub:
            assert set(sub) == set(data[section]), f"{section}: keys differ from the schema"
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"undocumented setting: {line!r}"


def test_partial_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("train:\n  epochs: 3\nmodel:\n  device: cpu\n")
    config = load_config(path, ["train.lr=0.01", "preprocess.target_shape=[32, 32, 24]"])
    assert config.train.epochs == 3
    assert config.train.batch_size == 2  # untouched default survives the partial file
    assert config.model.device == "cpu"
    assert config.train.lr == pytest.approx(0.01)
    assert config.preprocess.target_shape == (32, 32, 24)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=-1", "train.epochs"),
        ("train.epoch=3", "train.epoch"),
        ("train.lr=fast", "train.lr"),
        ("preprocess.target_shape=[64, 64]", "preprocess.target_shape"),
        ("preprocess.target_shape=[64, 0, 56]", "preprocess.target_shape"),
        ("model.device=gpu", "model.device"),
        ("node.port=70000", "node.port"),
        ("node.host=", "node.host"),  # empty: every interface
        ("storage.root=", "storage.root"),  # empty: the current directory
        ("bogus.key=1", "bogus"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert key in str(info.value)


def test_bad_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 2, column 1\)"):
        load_config(broken)
    twice = tmp_path / "twice.yaml"
    twice.write_text("storage:\n  root: /data\nnode:\n  port: 104\nstorage:\n  retention_days: 30\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML \(line 5, column 1\): duplicate key 'storage'"):
        load_config(twice)  # YAML alone would drop the first storage section, root and all
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="binary.yaml: not UTF-8 text"):
        load_config(binary)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["epochs"])


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="val_size"):
        load_config(overrides=["train.val_size=0.6", "train.test_size=0.5"])
    with pytest.raises(ConfigError, match="percentile_low"):
        load_config(overrides=["preprocess.percentile_low=99", "preprocess.percentile_high=90"])
    with pytest.raises(ConfigError, match=r"too small for model.depth 4: each axis needs at least 32 voxels"):
        load_config(overrides=["model.depth=4", "preprocess.target_shape=[64,64,24]"])
    assert load_config(overrides=["model.depth=4"]).model.depth == 4  # the default 64x64x56 grid fits


def test_peers_are_stored_without_padding_and_listed_once(tmp_path: Path) -> None:
    path = tmp_path / "peers.yaml"
    path.write_text("peers:\n  - {ae_title: 'PACS ', host: ' 127.0.0.1', port: 4242}\n")
    (peer,) = load_config(path).peers
    assert (peer.ae_title, peer.host) == ("PACS", "127.0.0.1")  # as callers and C-MOVE destinations are looked up
    twice = "  - {ae_title: PACS, host: 127.0.0.1, port: 4242}\n  - {ae_title: PACS, host: h, port: 1}\n"
    path.write_text("peers:\n" + twice)
    with pytest.raises(ConfigError, match="PACS listed more than once"):
        load_config(path)
    path.write_text("peers:\n  - {ae_title: '  ', host: 127.0.0.1, port: 4242}\n")
    with pytest.raises(ConfigError, match="ae_title"):
        load_config(path)


def test_allowed_calling_ae_titles_are_ae_titles() -> None:
    with pytest.raises(ConfigError, match=r"node\.allowed_calling_ae_titles\.1"):
        load_config(None, values={"node": {"allowed_calling_ae_titles": ["PACS", "A" * 17]}})
    assert load_config(None, values={"node": {"allowed_calling_ae_titles": ["A" * 16]}}).node.allowed_calling_ae_titles
    assert load_config(overrides=["node.ae_title=1234"]).node.ae_title == "1234"  # a number in YAML is the text
