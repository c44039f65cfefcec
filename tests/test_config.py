import re

import pytest

from prismfl.config import RunConfig, load_config, parse_override
from prismfl.errors import ConfigError


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, RunConfig) and cfg.partition.num_clients == 10


def test_overrides_are_typed():
    cfg = load_config(None, ["train.rounds=7", "train.lr=1", "train.mada=false", "partition.scheme=iid"])
    assert cfg.train.rounds == 7 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.mada is False and cfg.partition.scheme == "iid"


def test_parse_override():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a = hello") == (["a"], "hello")
    assert parse_override('a="x=y"') == (["a"], "x=y")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.rounds")


@pytest.mark.parametrize(
    "override,msg",
    [
        ("train.round=5", "unknown config key 'train.round'; did you mean 'train.rounds'"),
        ("trian.rounds=5", "unknown config key 'trian'; did you mean 'train'"),
        ("train.rounds=five", "train.rounds must be int, got str 'five'"),
        ("train.rounds=2.5", "train.rounds must be int"),
        ("train.mada=1", "train.mada must be bool"),
        ("partition.alpha=0", "partition.alpha must be a finite number in [0.001, 1e+06], got 0.0"),
        ("partition.alpha=-0.5", "partition.alpha must be a finite number in"),
        ("partition.scheme=shard", "did you mean 'shards'"),
        ("model.arch=resnt", "did you mean 'resnet'"),
        ("train.client_fraction=0", "train.client_fraction must be a finite number in (0, 1], got 0.0"),
        ("train.rounds=0", "train.rounds must be an integer in [1, 1000000], got 0"),
        ("data.resize=30", "data.resize must be"),
        ("loss.features=vgg19bn", "needs loss.vgg_weights"),
        ("train.broadcast=quantised", "did you mean 'quantized'"),
        ("train=3", "'train' must be a table"),
    ],
)
def test_bad_values_name_the_problem(override, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("*.toml"))
    assert {"smoke.toml", "fmnist-noniid.toml", "paper-fmnist.toml"} <= set(names)
    for p in root.glob("*.toml"):
        load_config(p)


def test_the_class_term_needs_a_small_cnn_feature_net():
    with pytest.raises(ConfigError, match="needs the public or random feature net"):
        load_config(None, ["loss.features=vgg19bn", "loss.vgg_weights=w.pth", "loss.class_term=true"])
    assert load_config(None, ["loss.class_term=true"]).loss.class_term


def _numeric_keys() -> list[tuple[str, str]]:
    from prismfl.configcheck import numeric_values

    return [(key, kind) for key, kind, _ in numeric_values(RunConfig())]


def test_every_numeric_key_has_one_range():
    from prismfl.configcheck import RANGES
    from prismfl.model.generators import MAX_MODES, MAX_WIDTH, MAX_Z_DIM

    assert sorted(key for key, _ in _numeric_keys()) == sorted(RANGES)
    assert (RANGES["model.z_dim"][1], RANGES["model.width"][1], RANGES["model.modes"][1]) == (
        MAX_Z_DIM,
        MAX_WIDTH,
        MAX_MODES,
    )


@pytest.mark.parametrize(("key", "kind"), _numeric_keys())
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e300", str(10**40)])
def test_every_numeric_key_refuses_values_out_of_its_range(key, kind, value):
    if key == "privacy.epsilon" and value in ("inf", "1e300", str(10**40)):  # inf: no privacy; the others: weak
        return
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        load_config(None, [f"{key}={value}"])
    assert "\n" not in str(info.value)


def test_range_bounds_are_kept():
    assert load_config(None, ["partition.alpha=0.001", "partition.scheme=dirichlet"]).partition.alpha == 0.001
    assert load_config(None, ["partition.alpha=1e6"]).partition.alpha == 1e6
    assert load_config(None, ["seed=9223372036854775807"]).seed == 2**63 - 1
    with pytest.raises(ConfigError, match=re.escape("seed must be an integer in [0, 9223372036854775808), got")):
        load_config(None, ["seed=9223372036854775808"])
    with pytest.raises(ConfigError, match=re.escape("train.smoothing must be a finite number in [0, 0.5), got 0.5")):
        load_config(None, ["train.smoothing=0.5"])
    with pytest.raises(ConfigError, match=re.escape("privacy.epsilon must be a number in (0, inf], got nan")):
        load_config(None, ["privacy.epsilon=nan"])


def test_config_text_is_bounded_in_size_and_depth(tmp_path):
    from prismfl.config import MAX_CONFIG_BYTES

    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="over prismfl's limit of 1,048,576"):
        load_config(big)
    deep = tmp_path / "deep.toml"
    deep.write_text("seed = " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(deep)
    deep.write_text("seed = " + "[" * 20 + "]" * 20 + "\n")
    with pytest.raises(ConfigError, match="nested more than 16 deep"):
        load_config(deep)
    with pytest.raises(ConfigError, match=r"seed must be int, got list \[\[\["):
        load_config(None, ["seed=" + "[" * 16 + "]" * 16])


def test_a_config_file_of_an_older_prismfl_loads_where_its_retired_keys_hold_the_kept_values(tmp_path):
    """Every shipped config used to say loss.normalize = "layer": such a file still loads (as the same run);
    a retired key at another value is refused in one line that says so."""
    path = tmp_path / "old.toml"
    path.write_text('[loss]\nnormalize = "layer"\ncovariance = false\n[train]\nfinal_mask = "mode"\nrounds = 2\n')
    cfg = load_config(path)
    assert cfg.train.rounds == 2 and cfg == load_config(None, ["train.rounds=2"])
    path.write_text('[loss]\nnormalize = "dim"\n')
    with pytest.raises(ConfigError, match="loss.normalize = 'dim' was retired"):
        load_config(path)
