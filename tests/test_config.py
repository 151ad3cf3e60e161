"""Configuration: conf/ composes into params.yaml, and stages read only declared keys, checked."""


import pytest
import yaml
from harness import ROOT

from llmpipe.config.compose import compose
from llmpipe.config.params import StageParams, declared_param_keys
from llmpipe.errors import ParamError, UndeclaredParamError


def test_params_yaml_holds_no_run_ids_timestamps_or_tracking_uris():
    text = (ROOT / "params.yaml").read_text().lower()
    for word in ("mlflow", "tracking_uri", "run_id", "timestamp", "sqlite:"):
        assert word not in text


def test_group_switch_composes_other_source():
    composed = compose(["data=local_files"], ROOT / "conf")
    assert composed["data"]["source"] == "local_files"
    assert "world" not in composed["data"]


def test_unknown_data_choice_is_one_clear_line():
    with pytest.raises(ParamError) as error:
        compose(["data=nosuchsource"], ROOT / "conf")
    message = str(error.value)
    assert "\n" not in message and "data/nosuchsource" in message and "embedded" in message


def test_reading_an_undeclared_key_fails():
    full = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = StageParams.for_stage("tokenize", full, ROOT / "dvc.yaml")
    assert params.int("tokenize.num_proc") >= 1
    with pytest.raises(UndeclaredParamError, match="stage 'tokenize' read params key 'model.n_layer'"):
        params.get("model.n_layer")
    # A prefix of a declared key is not declared: it would include keys DVC does not track for this stage.
    narrow = StageParams("x", full, ["tokenizer.vocab_size"])
    with pytest.raises(UndeclaredParamError):
        narrow.get("tokenizer")


def test_every_stage_declares_only_keys_that_exist():
    full = yaml.safe_load((ROOT / "params.yaml").read_text())
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for stage in pipeline["stages"]:
        for key in declared_param_keys(stage, ROOT / "dvc.yaml"):
            node = full
            for part in key.split("."):
                assert part in node, f"dvc.yaml stage {stage} declares {key}, absent from params.yaml"
                node = node[part]


@pytest.mark.parametrize("value, expected", [
    ("abc", "expected an integer >= 1, got 'abc' (str)"),
    (True, "expected an integer >= 1, got True (bool)"),
    (0, "expected an integer >= 1, got 0 (int)"),
])
def test_wrong_type_or_range_names_the_key(value, expected):
    params = StageParams("tokenize", {"tokenize": {"num_proc": value}}, ["tokenize"])
    with pytest.raises(ParamError) as error:
        params.int("tokenize.num_proc", min=1)
    assert str(error.value) == f"params.yaml: tokenize.num_proc: {expected}"


def test_missing_key_is_named():
    params = StageParams("tokenize", {"tokenize": {}}, ["tokenize"])
    with pytest.raises(ParamError, match="params.yaml: missing key 'tokenize.batch_size'"):
        params.int("tokenize.batch_size")


@pytest.mark.parametrize("value, message", [
    ({"Q3_K": "Q8_0"}, "params.yaml: quantize.embeddings: expected keys among Q8_0, Q2_K, got ['Q3_K'] (list)"),
    ({"Q2_K": "Q9"}, "params.yaml: quantize.embeddings.Q2_K: expected one of F16, Q8_0, Q4_K, got 'Q9' (str)"),
    ("Q4_K", "params.yaml: quantize.embeddings: expected a mapping such as {Q2_K: F16}, got 'Q4_K' (str)"),
])
def test_per_variant_types_name_the_wrong_key_or_value(value, message):
    params = StageParams("quantize", {"quantize": {"embeddings": value}}, ["quantize"])
    with pytest.raises(ParamError) as error:
        params.str_map("quantize.embeddings", keys=["Q8_0", "Q2_K"], values=["F16", "Q8_0", "Q4_K"])
    assert str(error.value) == message


def test_per_variant_types_read_as_a_mapping_without_unset_entries():
    params = StageParams("quantize", {"quantize": {"embeddings": {"Q2_K": "Q4_K", "Q8_0": None}, "output": None}},
                         ["quantize"])
    assert params.str_map("quantize.embeddings", keys=["Q8_0", "Q2_K"], values=["Q4_K"]) == {"Q2_K": "Q4_K"}
    assert params.str_map("quantize.output", keys=["Q8_0", "Q2_K"], values=["Q4_K"]) == {}


@pytest.mark.parametrize("value, expected", [
    ("q_proj", "expected a list of strings, such as [q_proj, k_proj], got 'q_proj' (str)"),
    ([], "expected a list of at least one string, got [] (list)"),
    (["q_proj", "q_proj"], "expected each value once, got ['q_proj'] (list)"),
    (["q_proj", "x_proj"], "expected values among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, "
                           "got ['x_proj'] (list)"),
])
def test_a_list_is_checked_for_shape_not_only_values(value, expected):
    """A string never passes for a list (it would become a list of characters), an empty list says what is
    missing, and a list that is a set refuses repeats."""
    from llmpipe.train.finetune_settings import LoRASettings

    params = StageParams("finetune", {"finetune": {"lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                                                            "target_modules": value}}}, ["finetune"])
    with pytest.raises(ParamError) as error:
        params.section("finetune.lora", LoRASettings)
    assert str(error.value) == f"params.yaml: finetune.lora.target_modules: {expected}"


def test_a_key_the_chosen_method_does_not_use_is_accepted_with_a_warning(capsys):
    from llmpipe.train.finetune_settings import FinetuneParams

    composed = yaml.safe_load((ROOT / "params.yaml").read_text())
    composed["finetune"]["lora"]["rank"] = 4
    settings = StageParams("finetune", composed, ["finetune"]).read(FinetuneParams)
    assert settings.method == "chat_tokens"
    warning = capsys.readouterr().err.strip()
    assert warning == ("warning: params.yaml: finetune.lora is set, but finetune.method is chat_tokens, which does "
                       "not use it")
    composed["finetune"]["method"] = "lora"
    StageParams("finetune", composed, ["finetune"]).read(FinetuneParams)
    assert capsys.readouterr().err == ""
