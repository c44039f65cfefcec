"""Each method's record (prismfl/capabilities.py): the registry builds a method for every record, each method
points at its own, and a config asking a method for what its record does not list is refused in one line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from prismfl import capabilities
from prismfl.capabilities import METHODS, Capabilities
from prismfl.config import load_config
from prismfl.errors import ConfigError

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
SECAGG = ["privacy.epsilon=5", "privacy.pool=1", "privacy.secagg=true"]


def test_the_registry_has_a_method_for_every_record_and_each_method_points_at_its_own():
    from prismfl.fl import wire
    from prismfl.fl.methods.registry import REGISTRY

    assert list(REGISTRY) == list(METHODS) == ["prism", "fedavg", "local", "central", "public"]
    assert all(cls.caps is METHODS[name] and cls.caps.name == name for name, cls in REGISTRY.items())
    assert METHODS["prism"].delta_uploads == wire.MAX_DELTA_M
    assert [name for name, c in METHODS.items() if c.per_client()] == ["local"]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (['train.method="fedavg"', "model.conditional=true"],
         "model.conditional is implemented for the prism, local, central and public methods, not 'fedavg'"),
        (['train.method="local"', *SECAGG], "privacy.secagg is implemented for the prism method, not 'local'"),
        (['train.method="fedavg"', 'robust.rule="trimmed"'],
         "robust.rule = 'trimmed' trims mask counts: it needs train.method = 'prism'"),
        (['train.method="central"', 'robust.rule="distance"'],
         "robust.rule needs a method whose clients' uploads are aggregated, not 'central'"),
        (['train.method="public"'],  # smoke.toml's feature net is the random one: no public images
         "train.method = 'public' trains on the public hold-out, which exists with loss.features = 'public' and "
         "partition.public_holdout > 0"),
        (['train.method="public"', 'loss.features="public"', "privacy.epsilon=5"],
         "train.method = 'public' reads no client's data, so there is nothing to make private: leave "
         "privacy.epsilon unset"),
        (["partition.num_clients=300"],
         "300 clients a round: a PRISM round aggregates at most 256 uploads (what its broadcast delta holds, "
         "fl/wire.py MAX_DELTA_M); lower train.client_fraction, or set train.broadcast = 'quantized'"),
        (['train.method="prism-nomada"'], "train.method = 'prism-nomada' is now train.method = 'prism' with "
                                          "train.mada = false"),
    ],
)  # fmt: skip
def test_a_method_is_refused_what_its_record_does_not_list(sets, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(SMOKE, sets)


def test_what_a_record_lists_is_accepted():
    assert load_config(SMOKE, ['train.method="fedavg"', 'robust.rule="distance"']).robust.rule == "distance"
    assert load_config(SMOKE, ["partition.num_clients=300", 'train.method="fedavg"']).partition.num_clients == 300
    assert load_config(SMOKE, ["partition.num_clients=300", 'train.broadcast="quantized"']).train.broadcast
    assert load_config(SMOKE, ['train.method="central"', "model.conditional=true"]).model.conditional


def test_a_new_record_is_all_a_config_check_needs(monkeypatch):
    """A method added to METHODS is a train.method value at once, checked against its record, and the
    messages that list the methods supporting an option name it."""
    toy = Capabilities("toy", capabilities.MASK_MODEL, secagg=True)
    monkeypatch.setitem(METHODS, "toy", toy)
    assert load_config(SMOKE, ['train.method="toy"', *SECAGG]).privacy.secagg
    with pytest.raises(ConfigError, match="^privacy.secagg is implemented for the prism and toy methods, not 'local'$"):
        load_config(SMOKE, ['train.method="local"', *SECAGG])
    with pytest.raises(ConfigError, match="^model.conditional is implemented for the prism, local, central and public"):
        load_config(SMOKE, ['train.method="toy"', "model.conditional=true"])


def test_building_a_method_checks_the_config_against_its_record():
    """A RunConfig changed after validation is checked again where its method is built."""
    import dataclasses

    from prismfl.fl.methods.registry import build

    cfg = load_config(SMOKE, ['train.method="fedavg"'])
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, conditional=True))
    with pytest.raises(ConfigError, match="not 'fedavg'$"):
        build(bad)


def test_loading_the_config_module_and_the_records_imports_no_torch():
    code = "import sys, prismfl.config, prismfl.capabilities; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
