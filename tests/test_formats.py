"""Annotation formats (official, LLaVA, ms-swift) normalised to the official record, validation, file reading.

Expected boxes are computed by hand here from the official rule ``round(x / W * 1000)``.
"""

import json

import pytest

from internvl_chat.data import records as records_module
from internvl_chat.data.errors import DataError
from internvl_chat.data.formats import detect_file_format, detect_format, to_official
from internvl_chat.data.records import count_records, read_records
from internvl_chat.data.validation import check_boxes, validate_official


def turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


def raises_kind(kind, record, **kwargs):
    with pytest.raises(DataError) as info:
        to_official(record, **kwargs)
    assert info.value.kind == kind, str(info.value)
    return info.value


# ---------------------------------------------------------------------------------------------------- detection


def test_detect_format_per_record():
    official = {"image": "a.jpg", "conversations": turns(("human", "<image>\nQ"), ("gpt", "A"))}
    assert detect_format(official) == "internvl"
    assert detect_format({"conversations": turns(("user", "Q"), ("assistant", "A"))}) == "llava"
    assert detect_format({"system": "S", "conversations": turns(("human", "Q"), ("gpt", "A"))}) == "llava"
    assert detect_format({"images": ["a.jpg"], "conversations": turns(("human", "Q"), ("gpt", "A"))}) == "llava"
    assert detect_format({"messages": [{"role": "user", "content": "Q"}]}) == "messages"
    assert detect_format({"conversations": [{"role": "user", "content": "Q"}]}) == "messages"
    assert detect_format({"query": "Q", "response": "A"}) == "swift"
    with pytest.raises(DataError) as info:
        detect_format({"text": "hello"})
    assert info.value.kind == "unknown_format"
    with pytest.raises(DataError) as info:
        detect_format(["not", "an", "object"])
    assert info.value.kind == "invalid_record"


def test_detect_file_format():
    official = {"conversations": turns(("human", "Q"), ("gpt", "A"))}
    llava = {"conversations": turns(("user", "Q"), ("assistant", "A"))}
    swift = {"query": "Q", "response": "A"}
    assert detect_file_format([official, official]) == "internvl"
    assert detect_file_format([official, llava]) == "llava"
    assert detect_file_format([(1, swift), (2, DataError("x")), (3, swift)]) == "swift"
    assert detect_file_format([official, swift]) == "auto"
    assert detect_file_format([]) == "auto"


def test_format_names_and_aliases():
    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    expected = {"conversations": turns(("human", "Q"), ("gpt", "A"))}
    assert to_official(record, "sharegpt") == expected
    assert to_official(record, "swift") == expected  # a meta entry's "swift" covers both ms-swift layouts
    assert to_official(record, "auto") == expected
    raises_kind("unknown_format", record, fmt="parquet")
    raises_kind("unknown_format", record, fmt="llava")
    raises_kind("unknown_format", {"conversations": turns(("human", "Q"), ("gpt", "A"))}, fmt="swift")


# ---------------------------------------------------------------------------------------------- official / LLaVA


@pytest.mark.parametrize(
    "record",
    [
        {"id": 7, "conversations": turns(("human", "Hi"), ("gpt", "Hello"))},
        {"image": "a.jpg", "width": 640, "height": 480, "conversations": turns(("human", "Q"), ("gpt", "A"))},
        {"image": ["a.jpg", "b.jpg"], "conversations": turns(("human", "Image-1: <image>\nImage-2: <image>\nQ"),
                                                            ("gpt", "A"))},
        {"video": "v.mp4", "clip": [1.5, 4], "conversations": turns(("human", "<video>\nQ"), ("gpt", "A"))},
        {"image": "a.jpg", "conversations": turns(
            ("system", "S"), ("human", "<image>\nWhere is <ref>the cat</ref>?"),
            ("gpt", "<ref>the cat</ref><box>[[0, 10, 500, 1000], [1, 2, 3, 4]]</box>"),
            ("human", "Read <quad>[[0, 0, 10, 0, 10, 10, 0, 10]]</quad>"), ("gpt", "ok"))},
    ],
)
def test_official_records_pass_through_unchanged(record):
    before = json.loads(json.dumps(record))
    out = to_official(record)
    assert out is record
    assert out == before


def test_llava_record_normalised():
    record = {
        "id": "x1",
        "system": "Be brief.",
        "images": ["a.jpg"],
        "conversations": [
            {"from": "USER", "value": "What is it?\n<image>"},  # LLaVA's trailing <image> stays where it is
            {"from": "Assistant", "value": "A cat."},
        ],
    }
    before = json.loads(json.dumps(record))
    out = to_official(record)
    assert out == {
        "id": "x1",
        "image": "a.jpg",
        "conversations": turns(("system", "Be brief."), ("human", "What is it?\n<image>"), ("gpt", "A cat.")),
    }
    assert record == before  # the input is not modified
    empty_system = {"system": "", "conversations": turns(("human", "Q"), ("gpt", "A"))}
    assert to_official(empty_system) == {"conversations": turns(("human", "Q"), ("gpt", "A"))}


# ------------------------------------------------------------------------------------------------------ ms-swift


def test_swift_query_response_history_system():
    record = {
        "system": "S",
        "query": "Q3",
        "response": "A3",
        "history": [["Q1", "A1"], ["Q2", "A2"]],
        "id": 5,
    }
    assert to_official(record) == {
        "conversations": turns(("system", "S"), ("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2"),
                               ("human", "Q3"), ("gpt", "A3")),
        "id": 5,
    }


def test_swift_single_and_multiple_images():
    single = to_official({"query": "55555", "response": "66666", "images": ["p.jpg"]})
    assert single == {"conversations": turns(("human", "55555"), ("gpt", "66666")), "image": "p.jpg"}

    tagged = {
        "query": "Image-1: <image>\nImage-2: <image>\nDescribe the two images.",
        "response": "xx",
        "history": [["<image>Describe the image", "yy"], ["CC", "DD"]],
        "images": ["p1.jpg", "p2.jpg", "p3.jpg"],
    }
    out = to_official(tagged)
    assert out["image"] == ["p1.jpg", "p2.jpg", "p3.jpg"]
    assert out["conversations"][0]["value"] == "<image>Describe the image"
    assert out["conversations"][4]["value"] == tagged["query"]

    # ms-swift accepts several images without tags; they go in front of the first query, one "<image>\n" each.
    untagged = to_official({"query": "eeeee", "response": "fffff", "history": [], "images": ["a.jpg", "b.jpg"]})
    assert untagged["conversations"][0] == {"from": "human", "value": "<image>\n<image>\neeeee"}
    assert untagged["image"] == ["a.jpg", "b.jpg"]


def test_swift_inline_img_paths_in_placeholder_order():
    record = {
        "query": "Image-1: <img>img_path</img>\n Image-2: <img>img_path2</img>\n Describe the two images in detail.",
        "response": "xxxxxxxxx",
        "history": [["<img>img_path3</img> Describe the image", "xxxxxxx"], ["CCCCC", "DDDDD"]],
    }
    out = to_official(record)
    assert out["image"] == ["img_path3", "img_path", "img_path2"]
    assert out["conversations"][0]["value"] == "<image> Describe the image"
    assert out["conversations"][4]["value"] == (
        "Image-1: <image>\n Image-2: <image>\n Describe the two images in detail."
    )

    mixed = to_official({"query": "<image> and <img>b.jpg</img> and <image>", "response": "r",
                         "images": ["a.jpg", "c.jpg"]})
    assert mixed["image"] == ["a.jpg", "b.jpg", "c.jpg"]
    assert mixed["conversations"][0]["value"] == "<image> and <image> and <image>"


def test_swift_video():
    out = to_official({"query": "Describe this video in detail. Don't repeat", "response": "x", "history": [],
                       "videos": ["v.mp4"]})
    assert out == {"conversations": turns(("human", "Describe this video in detail. Don't repeat"), ("gpt", "x")),
                   "video": "v.mp4"}
    assert to_official({"query": "<video>\nQ", "response": "A", "videos": "v.mp4"})["video"] == "v.mp4"
    raises_kind("bad_media", {"query": "Q", "response": "A", "videos": ["a.mp4", "b.mp4"]})


def test_messages_format():
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "<image>And this?"},
            {"role": "assistant", "content": "B"},
        ],
        "images": ["b.jpg"],
    }
    assert to_official(record) == {
        "conversations": turns(("system", "S"), ("human", "<image>What?"), ("gpt", "A"), ("human", "<image>And this?"),
                               ("gpt", "B")),
        "image": ["a.jpg", "b.jpg"],
    }
    video = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v.mp4"}},
                                                       {"type": "text", "text": "Q"}]},
                          {"role": "assistant", "content": "A"}]}
    assert to_official(video) == {"conversations": turns(("human", "<video>Q"), ("gpt", "A")), "video": "v.mp4"}
    no_loss = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "loss": False}]}
    raises_kind("unsupported", no_loss)
    raises_kind("bad_roles", {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "A"}]})


# --------------------------------------------------------------------------------------------------- grounding

SWIFT_OBJECT = "[{\"caption\": \"guy in red\", \"bbox\": [138, 136, 235, 359], \"bbox_type\": \"real\", \"image\": 0}]"


def test_objects_real_pixels_from_record_size():
    # 200x100 image: x / 200 * 1000, y / 100 * 1000.
    record = {"query": "<image>\nFind <ref-object>", "response": "<bbox>", "images": ["a.jpg"], "width": 200,
              "height": 100, "objects": {"ref": ["the dog"], "bbox": [[50, 25, 150, 100]], "bbox_type": "real"}}
    out = to_official(record)
    assert out["conversations"] == turns(("human", "<image>\nFind <ref>the dog</ref>"),
                                         ("gpt", "<box>[[250, 250, 750, 1000]]</box>"))
    assert out["width"] == 200 and out["height"] == 100


def test_objects_real_pixels_from_image_size_fn_and_rounding():
    # The seed's example on a 640x480 image: 138/640*1000 = 215.6 -> 216, 136/480*1000 = 283.3 -> 283,
    # 235/640*1000 = 367.2 -> 367, 359/480*1000 = 747.9 -> 748.
    seen = []

    def size_fn(path):
        seen.append(path)
        return 640, 480

    for query, response, human, gpt in [
        ("Find <bbox>", "<ref-object>", "Find <box>[[216, 283, 367, 748]]</box>", "<ref>guy in red</ref>"),
        ("Find <ref-object>", "<bbox>", "Find <ref>guy in red</ref>", "<box>[[216, 283, 367, 748]]</box>"),
    ]:
        record = {"query": query, "response": response, "images": ["/coco/1507.jpg"], "objects": SWIFT_OBJECT}
        out = to_official(record, image_size_fn=size_fn)
        assert out["conversations"] == turns(("human", human), ("gpt", gpt))
    assert seen == ["/coco/1507.jpg", "/coco/1507.jpg"]
    # Without a size the conversion must say so rather than guess.
    raises_kind("bad_objects", {"query": "Find <ref-object>", "response": "<bbox>", "images": ["x.jpg"],
                                "objects": SWIFT_OBJECT})


def test_objects_norm_1000_and_norm_1():
    base = {"query": "<image>\n<ref-object>", "response": "<bbox>", "images": ["a.jpg"]}
    norm1000 = to_official({**base, "objects": [{"caption": "c", "bbox": [10, 20, 300.4, 999.6],
                                                 "bbox_type": "norm_1000"}]})
    assert norm1000["conversations"][1]["value"] == "<box>[[10, 20, 300, 1000]]</box>"
    norm1 = to_official({**base, "objects": {"ref": ["c"], "bbox": [[0.1, 0.25, 0.5, 0.75]], "bbox_type": "norm1"}})
    assert norm1["conversations"][1]["value"] == "<box>[[100, 250, 500, 750]]</box>"
    norm_1 = to_official({**base, "objects": [{"caption": "c", "bbox": [0.0, 0.0, 1.0, 0.333],
                                               "bbox_type": "norm_1"}]})
    assert norm_1["conversations"][1]["value"] == "<box>[[0, 0, 1000, 333]]</box>"


def test_objects_several_boxes_images_and_refs():
    record = {
        "query": "Image-1: <image>\nImage-2: <image>\nWhere are <ref-object> and <ref-object>?",
        "response": "<ref-object><bbox> and <ref-object><bbox>",
        "images": ["a.jpg", "b.jpg"],
        "width_list": [100, 400],
        "height_list": [100, 200],
        "objects": {"ref": ["cats", "dog", "cats", "dog"],
                    "bbox": [[[0, 0, 10, 10], [50, 50, 100, 100]], [100, 20, 200, 100]],
                    "image_id": [0, 1]},
    }
    out = to_official(record)
    assert out["conversations"][1]["value"] == (
        "<ref>cats</ref><box>[[0, 0, 100, 100], [500, 500, 1000, 1000]]</box> and "
        "<ref>dog</ref><box>[[250, 100, 500, 500]]</box>"
    )
    assert out["conversations"][0]["value"].endswith("Where are <ref>cats</ref> and <ref>dog</ref>?")


def test_objects_errors():
    base = {"query": "<image>\n<ref-object>", "response": "<bbox>", "images": ["a.jpg"], "width": 100, "height": 50}
    err = raises_kind("box_out_of_range", {**base, "objects": {"ref": ["c"], "bbox": [[0, 0, 120, 10]]}})
    assert "1200" in str(err)
    raises_kind("box_out_of_range", {**base, "objects": {"ref": ["c"], "bbox": [[50, 0, 10, 10]]}})
    raises_kind("bad_objects", {**base, "response": "<bbox><bbox>", "objects": {"ref": ["c"], "bbox": [[0, 0, 1, 1]]}})
    raises_kind("bad_objects", {**base, "objects": {"ref": ["c"], "bbox": [[0, 0, 1, 1]], "bbox_type": "xywh"}})
    raises_kind("bad_objects", {**base, "objects": "{not json"})
    raises_kind("bad_objects", {**base, "objects": {"ref": ["c"], "bbox": [[0, 0, 1]]}})
    raises_kind("bad_objects", {**base, "objects": {"ref": ["c"], "bbox": [[0, 0, 1, 1]], "image_id": [3]}})
    raises_kind("bad_objects", {"query": "<ref-object>", "response": "<bbox>"})  # placeholders, no objects


# -------------------------------------------------------------------------------------------------- validation


def conv(*pairs, **extra):
    return {"conversations": turns(*pairs), **extra}


@pytest.mark.parametrize(
    "kind, record",
    [
        ("invalid_record", ["a", "list"]),
        ("unknown_format", {"image": "a.jpg"}),
        ("bad_turn", {"conversations": "human: hi"}),
        ("bad_turn", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "A"}]}),
        ("bad_turn", conv(("human", "Q"), ("gpt", ["A"]))),
        ("bad_turn", {"query": "Q", "response": None}),
        ("bad_turn", {"query": "Q", "response": "A", "history": [["only one"]]}),
        ("bad_roles", conv(("human", "Q"), ("robot", "A"))),
        ("bad_roles", conv(("human", "Q"), ("system", "S"), ("gpt", "A"))),
        ("bad_roles", conv(("human", "Q"), ("human", "Q2"))),
        ("bad_roles", {"system": "S", "conversations": turns(("system", "S2"), ("human", "Q"), ("gpt", "A"))}),
        ("empty_conversation", {"conversations": []}),
        ("empty_conversation", {"messages": []}),
        ("empty_conversation", conv(("human", "Q"), ("gpt", "  "))),
        ("bad_media", conv(("human", "Q"), ("gpt", "A"), image=3)),
        ("bad_media", conv(("human", "Q"), ("gpt", "A"), image=["a.jpg", ""])),
        ("bad_media", conv(("human", "Q"), ("gpt", "A"), video=["a.mp4", "b.mp4"])),
        ("bad_media", conv(("human", "Q"), ("gpt", "A"), image="a.jpg", video="v.mp4")),
        ("bad_media", conv(("human", "Q"), ("gpt", "A"), video="v.mp4", clip=[5, 2])),
        ("bad_media", {"query": "Q", "response": "A", "images": [None]}),
        ("placeholder_count", conv(("human", "<image>\nQ"), ("gpt", "A"))),
        ("placeholder_count", conv(("human", "<image><image>Q"), ("gpt", "A"), image="a.jpg")),
        ("placeholder_count", conv(("human", "Q"), ("gpt", "A"), image=["a.jpg", "b.jpg"])),
        ("placeholder_count", conv(("human", "<image>Q"), ("gpt", "A"), image=["a.jpg", "b.jpg"])),
        ("placeholder_count", conv(("human", "<image>Q"), ("gpt", "<image>A"), image=["a.jpg", "b.jpg"])),
        ("placeholder_count", conv(("human", "<video>Q"), ("gpt", "A"))),
        ("placeholder_count", conv(("human", "<video><video>Q"), ("gpt", "A"), video="v.mp4")),
        ("placeholder_count", conv(("human", "<image>Q"), ("gpt", "A"), video="v.mp4")),
        ("placeholder_count", {"query": "<image> and <image>", "response": "A", "images": ["a.jpg"]}),
        ("placeholder_count", {"query": "<image> Q", "response": "A", "images": ["a.jpg", "b.jpg"]}),
        ("reserved_token", conv(("human", "<img>Q"), ("gpt", "A"))),
        ("reserved_token", conv(("human", "Q"), ("gpt", "A<IMG_CONTEXT>"))),
        ("bad_box", conv(("human", "Q"), ("gpt", "<box>[[1, 2, 3]]</box>"))),
        ("bad_box", conv(("human", "Q"), ("gpt", "<box>[1, 2, 3, 4]</box>"))),
        ("bad_box", conv(("human", "Q"), ("gpt", "<box>[[0.1, 0.2, 0.3, 0.4]]</box>"))),
        ("bad_box", conv(("human", "Q"), ("gpt", "<box>[[1, 2, 3, 4]]"))),
        ("box_out_of_range", conv(("human", "Q"), ("gpt", "<box>[[0, 0, 1001, 5]]</box>"))),
        ("box_out_of_range", conv(("human", "Q"), ("gpt", "<box>[[500, 0, 100, 5]]</box>"))),
        ("box_out_of_range", conv(("human", "<box>[[0, 10, 5, 5]]</box>?"), ("gpt", "A"))),
    ],
)
def test_validation_errors(kind, record):
    raises_kind(kind, record)


def test_errors_carry_file_and_line():
    err = raises_kind("bad_roles", conv(("human", "Q")), file="data/train.jsonl", line=12)
    assert err.file == "data/train.jsonl" and err.line == 12
    assert str(err).startswith("data/train.jsonl:12: ")
    with pytest.raises(DataError):
        validate_official(conv(("human", "Q")))


def test_check_boxes():
    assert check_boxes("<ref>a</ref><box>[[0, 0, 1000, 1000]]</box> <box> [[1, 2, 3, 4], [5, 6, 7, 8]] </box>") == []
    assert check_boxes("plain text [[5000, 1, 2, 3]]") == []
    assert check_boxes("<quad>[[0, 0, 10, 0, 10, 10, 0, 10]]</quad>") == []
    problems = check_boxes("<quad>[[0, 0, 10, 0]]</quad><box>[[0, 0, 2000, 1]]</box><ref>x")
    assert sorted(p.kind for p in problems) == ["bad_box", "bad_box", "box_out_of_range"]
    assert all(str(p) for p in problems)
    assert [p.kind for p in check_boxes("<quad>[[0, 0, 10, 0, 10, 10, 0, 1001]]</quad>")] == ["box_out_of_range"]
    assert [p.kind for p in check_boxes("<box>not a box</box>")] == ["bad_box"]


# ---------------------------------------------------------------------------------------------------- reading


def test_read_jsonl_line_numbers_blank_and_invalid(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"query": "q1", "response": "r1"}),
        "",
        "   ",
        '{"query": "q2", "response": ',  # truncated
        json.dumps([1, 2]),
        json.dumps({"query": "q3", "response": "r3"}),
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    items = list(read_records(path))
    assert [line for line, _ in items] == [1, 4, 5, 6]
    assert items[0][1] == {"query": "q1", "response": "r1"}
    assert isinstance(items[1][1], DataError) and items[1][1].kind == "invalid_json"
    assert items[1][1].line == 4 and items[1][1].file == str(path)
    assert isinstance(items[2][1], DataError) and items[2][1].kind == "invalid_record"
    assert items[3][1]["query"] == "q3"
    assert count_records(path) == 4


def test_read_json_list_element_index(tmp_path, monkeypatch):
    monkeypatch.setattr(records_module, "_CHUNK", 7)  # force elements to straddle read boundaries
    records = [
        {"id": i, "image": f"{i}.jpg", "conversations": turns(("human", "<image>\nQ" * (i + 1)), ("gpt", "A"))}
        for i in range(5)
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records, indent=2))
    items = list(read_records(path))
    assert [line for line, _ in items] == [1, 2, 3, 4, 5]
    assert [record for _, record in items] == records
    assert count_records(path) == 5


def test_read_json_list_bad_element_and_jsonl_named_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"query": "a", "response": "b"},\n{"query": oops},\n{"query": "c", "response": "d"}\n]')
    items = list(read_records(path))
    assert items[0] == (1, {"query": "a", "response": "b"})
    line, err = items[1]
    assert line == 2 and isinstance(err, DataError) and err.kind == "invalid_json"
    assert "file line 3" in str(err)
    assert len(items) == 2  # nothing after an unparseable element
    assert count_records(path) == 2

    not_list = tmp_path / "scalar.json"
    not_list.write_text("42")
    [(line, err)] = list(read_records(not_list))
    assert line == 1 and err.kind == "invalid_json"

    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    assert list(read_records(empty)) == [] and count_records(empty) == 0

    jsonl_named_json = tmp_path / "lines.json"
    jsonl_named_json.write_text('{"query": "a", "response": "b"}\n\n{"query": "c", "response": "d"}\n')
    assert [line for line, _ in read_records(jsonl_named_json)] == [1, 3]
    assert count_records(jsonl_named_json) == 2


def test_read_then_convert_end_to_end(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"query": "<img>a.jpg</img> What?", "response": "A"},
        {"conversations": turns(("human", "Hi"), ("gpt", "Hello"))},
        {"conversations": turns(("human", "<image>\n<image>"), ("gpt", "x")), "image": "a.jpg"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    good, bad = [], []
    for line, record in read_records(path):
        try:
            good.append(to_official(record, file=str(path), line=line))
        except DataError as err:
            bad.append(err)
    assert good[0] == {"conversations": turns(("human", "<image> What?"), ("gpt", "A")), "image": "a.jpg"}
    assert good[1] == rows[1]
    assert [(e.line, e.kind) for e in bad] == [(3, "placeholder_count")]
