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
        ("partition.alpha=0", "partition.alpha must be > 0"),
        ("partition.alpha=-0.5", "partition.alpha must be > 0"),
        ("partition.scheme=shard", "did you mean 'shards'"),
        ("model.arch=resnt", "did you mean 'resnet'"),
        ("train.client_fraction=0", "client_fraction must be in"),
        ("train.rounds=0", "train.rounds must be at least 1"),
        ("data.resize=30", "data.resize must be"),
        ("loss.features=vgg19bn", "needs loss.vgg_weights"),
        ("train.upload_sampling=strata", "did you mean 'stratified'"),
        ("train=3", "'train' must be a table"),
    ],
)
def test_bad_values_name_the_problem(override, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
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


def test_class_and_covariance_terms_need_a_small_cnn_feature_net():
    for term in ("class_term", "covariance"):
        with pytest.raises(ConfigError, match="need the public or random feature net"):
            load_config(None, ["loss.features=vgg19bn", "loss.vgg_weights=w.pth", f"loss.{term}=true"])
    assert load_config(None, ["loss.class_term=true", "loss.covariance=true"]).loss.class_term
