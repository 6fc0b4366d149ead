import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import QuantConfig, Quantizer, QuantLinear, TensorQuant


def test_short_names_defaults():
    c = QuantConfig.parse("w8a8")
    assert c.weight == TensorQuant(bits=8, granularity="channel", axis=0)
    assert c.act == TensorQuant(bits=8, granularity="tensor", symmetric=True, init="minmax")
    assert c.embedding is None and c.output is None

    assert QuantConfig.parse("w2a8").weight.scheme == "ternary"
    assert QuantConfig.parse("w1a8").weight.scheme == "binary"
    assert QuantConfig.parse("w3a8").weight.bits == 3

    g = QuantConfig.parse("w4g128a16")
    assert (g.weight.granularity, g.weight.group_size, g.act) == ("group", 128, None)
    assert QuantConfig.parse("w4g128") == g  # omitted a = FP activations

    e = QuantConfig.parse("w4a8-e8")
    assert e.embedding == TensorQuant(bits=8, granularity="channel", axis=0)
    assert QuantConfig.parse("W8A8-E8").embedding.bits == 8  # case-insensitive


@pytest.mark.parametrize("name", ["w8a8", "w4a8", "w3a8", "w2a8", "w1a8", "w4g128a16", "w4a8-e8",
                                  "w8a8-e8", "w16a8", "w4a8-e8-o8", "w2g64a8"])
def test_canonical_names_round_trip(name):
    c = QuantConfig.parse(name)
    assert str(c) == name
    assert QuantConfig.parse(str(c)) == c


def test_overrides_round_trip_and_dict():
    c = QuantConfig.parse("w4a8:weight.learnable=true,act.init=mse,act.symmetric=false")
    assert c.weight.learnable and c.act.init == "mse" and not c.act.symmetric
    assert QuantConfig.parse(str(c)) == c
    assert QuantConfig.from_dict(c.to_dict()) == c
    # YAML-style partial dict on top of a short name
    d = QuantConfig.parse({"name": "w4a8", "act": {"init": "percentile", "percentile": 99.9}})
    assert d.act.init == "percentile" and d.act.percentile == 99.9 and d.weight.bits == 4


_specs = st.builds(
    TensorQuant,
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel", "token", "group"]),
    axis=st.sampled_from([0, 1]),
    group_size=st.sampled_from([32, 64, 128]),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    init=st.sampled_from(["minmax", "percentile", "mse"]),
    percentile=st.sampled_from([99.0, 99.9, 99.99]),
    learnable=st.booleans(),
)


@settings(max_examples=50, deadline=None)
@given(w=_specs, a=st.none() | _specs, e=st.none() | _specs)
def test_any_config_round_trips_through_its_name(w, a, e):
    c = QuantConfig(weight=w, act=a, embedding=e)
    assert QuantConfig.parse(str(c)) == c
    assert QuantConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("bad, field", [
    ({"weight": {"bits": 17}}, "weight.bits=17 is out of range 2..8"),
    ({"weight": {"bits": 0}}, "weight.bits=0 is out of range 2..8"),
    ({"act": {"bits": 1}}, "act.bits=1 is out of range 2..8"),
    ({"act": {"granularity": "row"}}, "act.granularity='row'"),
    ({"weight": {"rounding": "up"}}, "weight.rounding='up'"),
    ({"embedding": {"init": "max"}}, "embedding.init='max'"),
    ({"weight": {"scheme": "ternary", "bits": 4}}, "weight.bits=4 must be 2"),
    ({"act": {"scheme": "binary", "bits": 1}}, "act.scheme='binary'"),
    ({"weight": {"colour": 1}}, "weight: unknown field"),
])
def test_invalid_configs_name_the_field(bad, field):
    with pytest.raises(ValueError) as e:
        QuantConfig.from_dict(bad)
    assert field in str(e.value)


@pytest.mark.parametrize("name, field", [("w17a8", "weight.bits=17"), ("w0a8", "weight.bits=0"),
                                         ("w8a1", "act.bits=1"), ("w8a8-e9", "embedding.bits=9"),
                                         ("w4a8:act.init=foo", "act.init='foo'"), ("x8", "config name"),
                                         ("w4:act.bits=8", "act is not quantized")])
def test_invalid_names(name, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("'", "'")):
        QuantConfig.parse(name)


def test_direct_construction_validates():
    with pytest.raises(ValueError, match="bits=17 is out of range 2..8"):
        TensorQuant(bits=17)
    with pytest.raises(ValueError, match="bits=1 is out of range 2..8"):
        TensorQuant(bits=1)  # 1 bit is only valid with scheme="binary"


def test_group_size_must_divide_dimension():
    lin = torch.nn.Linear(48, 8)
    with pytest.raises(ValueError, match=r"weight\.group_size=32 does not divide the last dim 48"):
        QuantLinear.from_float(lin, "w4g32a8")
    q = Quantizer(TensorQuant(bits=4, granularity="group", group_size=32), name="act", kind="act")
    with pytest.raises(ValueError, match=r"act\.group_size=32"):
        q(torch.randn(2, 40))
