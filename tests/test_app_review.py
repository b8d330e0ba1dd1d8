"""The Review page, Annotate with several readers per image, and Metrics' agreement table, through AppTest."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from db.demo import seed_demo
from db.models import AuditEntry, ImageReview, Reading
from db.readers import save_read, set_readers_per_image
from db.service import image_detail
from tests.test_app import SIZE, _app, _draw, _open, _sessions, _texts, _unlabeled_ids

NODULE = ("Nodule", 10.0, 10.0, 30.0, 30.0)
NODULE_B = ("Nodule", 11.0, 10.0, 31.0, 31.0)
MASS = ("Mass", 40.0, 40.0, 60.0, 60.0)


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """The demo store of tests/test_app.py (10 images of 64 px), the pages pointed at it."""
    url = f"sqlite:///{tmp_path / 'workbench.db'}"
    monkeypatch.setenv("OXNET_DB_URL", url)
    monkeypatch.setenv("OXNET_DEMO", "0")
    seed_demo(url, n=10, size=SIZE)
    return url


def _table(at, column):
    """The dataframe with ``column`` (AppTest's dataframes carry no key)."""
    [table] = [d.value for d in at.dataframe if column in d.value.columns]
    return table


def _readers(url, n=2):
    with _sessions(url).begin() as s:
        set_readers_per_image(s, n, annotator="admin")


def _read(url, image_id, who, boxes, complete=True):
    with _sessions(url).begin() as s:
        return save_read(s, image_id, annotator=who, present=[b[0] for b in boxes], boxes=list(boxes), no_finding=False,
                         complete=complete, expected_revision=0).id


def _agreed_and_disputed(url):
    """Two readers per image; one image they agree on (Nodule, Nodule), one they do not (Nodule, Mass):
    (agreed, disputed, the id of the disputed image's Mass read)."""
    _readers(url)
    agreed, disputed = _unlabeled_ids(url)[:2]
    _read(url, agreed, "dr.a", [NODULE])
    _read(url, agreed, "dr.b", [NODULE_B])
    _read(url, disputed, "dr.a", [NODULE])
    return agreed, disputed, _read(url, disputed, "dr.b", [MASS])


def test_review_page_lists_disagreements_first_and_accepts_a_read(demo):
    agreed, disputed, read_b = _agreed_and_disputed(demo)
    at = _app("views/review.py", annotator="dr.rev", role="reviewer")
    table = _table(at, "reason")
    assert list(table["image"]) == [disputed, agreed] and "disagree" in table["reason"][0]
    assert at.selectbox(key="review_image_id").value == disputed
    assert table["readers"][0] == "dr.a, dr.b" and "consensus, not reviewed" in _texts(at)
    assert "present: Nodule · 1 box(es)" in _texts(at) and "present: Mass · 1 box(es)" in _texts(at)  # side by side
    assert len(at.get("image")) == 3  # two reads and the training label, each drawn with its boxes
    agreement = _table(at, "boxes")
    assert "Nodule" in list(agreement["class"])
    at.button(key=f"review_accept_{read_b}").click().run()
    assert not at.exception, at.exception
    assert f"Image {disputed}: saved as its training label" in _texts(at)
    with _sessions(demo)() as s:
        detail = image_detail(s, disputed)
        assert detail.boxes == [MASS] and detail.labels == {"Mass": True}
        assert s.get(ImageReview, disputed).status == "reviewed"
        last = s.scalars(select(AuditEntry).where(AuditEntry.image_id == disputed).order_by(AuditEntry.id.desc())).first()
        assert (last.action, last.annotator.name) == ("review_accept", "dr.rev")
    assert list(_table(at, "reason")["image"]) == [agreed]  # reviewed: out of the list


def test_review_merge_and_edit_in_annotate(demo):
    _readers(demo)
    image = _unlabeled_ids(demo)[0]
    _read(demo, image, "dr.a", [NODULE])
    _read(demo, image, "dr.b", [MASS])
    at = _app("views/review.py", annotator="dr.rev", role="reviewer")
    at.button(key="review_merge").click().run()
    assert not at.exception, at.exception
    with _sessions(demo)() as s:
        assert sorted(b[0] for b in image_detail(s, image).boxes) == ["Mass", "Nodule"]
    at.toggle(key="review_include_reviewed").set_value(True).run()
    at.button(key="review_edit").click().run()
    assert not at.exception, at.exception
    assert at.session_state["annotate_review"] == image
    at.switch_page("views/annotate.py").run()  # AppTest's next run stays on its own page: follow the switch
    assert "Reviewing: your save becomes this image's training label" in _texts(at)
    assert "Boxes** (2)" in _texts(at)  # the reviewer edits the label itself, not a read of their own
    at.button(key="annotate_save").click().run()
    assert not at.exception, at.exception
    with _sessions(demo)() as s:
        last = s.scalars(select(AuditEntry).where(AuditEntry.image_id == image).order_by(AuditEntry.id.desc())).first()
        assert (last.action, last.annotator.name) == ("review_edit", "dr.rev")


def test_annotate_shows_a_reader_only_their_own_read(demo):
    _readers(demo)
    image = _unlabeled_ids(demo)[0]
    _read(demo, image, "dr.a", [NODULE, MASS])
    at = _open(image)  # as dr.test, the second reader
    assert not at.exception, at.exception
    assert "Boxes** (0)" in _texts(at) and "dr.a" not in _texts(at) and "dr\\.a" not in _texts(at)
    at.button(key="annotate_cls_5").click().run()  # Nodule
    _draw(at, ("Nodule", 110, 100, 200, 210))  # canvas at scale 10: (11, 10) - (31, 31) in the image
    at.button(key="annotate_save").click().run()
    assert not at.exception, at.exception
    assert f"Saved image {image}" in _texts(at)
    with _sessions(demo)() as s:
        assert sorted(r.annotator.name for r in s.scalars(select(Reading).where(Reading.image_id == image))) == ["dr.a", "dr.test"]
        detail = image_detail(s, image)  # the second read wrote the consensus: the agreed Nodule, not dr.a's lone Mass
        assert [b[0] for b in detail.boxes] == ["Nodule"] and s.get(ImageReview, image).status == "consensus"


def test_metrics_shows_the_reader_agreement(demo):
    at = _app("views/metrics.py")
    assert "Reader agreement" not in [h.value for h in at.subheader]  # one reader per image: no such section
    _readers(demo)
    at = _app("views/metrics.py")
    assert "No image has all its 2 reads yet" in _texts(at)
    image = _unlabeled_ids(demo)[0]
    _read(demo, image, "dr.a", [NODULE])
    _read(demo, image, "dr.b", [NODULE_B])
    at = _app("views/metrics.py")
    table = _table(at, "box F1")
    assert table.set_index("class").loc["Nodule", "box F1"] == 1.0


def test_annotate_take_next_hands_an_image_to_two_readers_then_moves_on(demo):
    _readers(demo)
    taken = []
    for who in ("dr.a", "dr.b", "dr.c"):
        at = _app("views/annotate.py", annotator=who)
        at.button(key="annotate_take_next").click().run()
        assert not at.exception, at.exception
        taken.append(at.session_state["annotate_image_id"])
    first, second = _unlabeled_ids(demo)[:2]
    assert taken == [first, first, second]  # two readers of the first image, then the next one


def test_review_buttons_are_a_reviewers_and_a_refused_review_is_a_message(demo, monkeypatch):
    """An annotator sees the reads but no review buttons and no readers setting (a reviewer no setting
    either); when the page does offer a button to a user the store refuses (the role check runs in the
    write's transaction: a role changed meanwhile), the refusal is the role check's sentence, nothing
    is saved, and no traceback shows."""
    import app.store

    _readers(demo)
    image = _unlabeled_ids(demo)[0]
    _read(demo, image, "dr.a", [NODULE])
    read_b = _read(demo, image, "dr.b", [MASS])
    at = _app("views/review.py", annotator="dr.ann", role="annotator")
    assert "A reviewer can accept, merge or edit these reads." in _texts(at)
    assert "An admin can change it." in _texts(at)
    keys = {b.key for b in at.button}
    assert not keys & {f"review_accept_{read_b}", "review_merge", "review_edit", "review_set_readers"}
    at = _app("views/review.py", annotator="dr.rev", role="reviewer")
    assert f"review_accept_{read_b}" in {b.key for b in at.button}
    assert "review_set_readers" not in {b.key for b in at.button}  # the setting is an admin's
    with _sessions(demo)() as s:
        before = image_detail(s, image).version
    monkeypatch.setattr(app.store, "may", lambda role: True)  # the page offers everything; the store decides
    at = _app("views/review.py", annotator="dr.ann", role="annotator")
    at.button(key=f"review_accept_{read_b}").click().run()
    assert not at.exception, at.exception
    assert "Not saved: dr.ann (annotator) may not review reads: that needs the reviewer role" in _texts(at)
    at.button(key="review_edit").click().run()
    assert not at.exception, at.exception
    assert "Not opened: dr.ann (annotator) may not review reads: that needs the reviewer role" in _texts(at)
    at.number_input(key="review_readers").set_value(3).run()
    at.button(key="review_set_readers").click().run()
    assert not at.exception, at.exception
    assert "dr.ann (annotator) may not change the readers per image: that needs the admin role" in _texts(at)
    with _sessions(demo)() as s:
        assert image_detail(s, image).version == before and s.get(ImageReview, image).status == "consensus"
        assert s.scalars(select(AuditEntry).where(AuditEntry.action.in_(["review_accept", "set_readers_per_image"]))
                         .where(AuditEntry.annotator.has(name="dr.ann"))).all() == []


def test_two_reviewers_on_one_image_the_second_click_acts_on_what_its_page_showed(demo):
    """Three reviewers have the same disputed image open. The first accepts a read; the second and the
    third, whose pages still show the image as it was, then click Merge and Edit: both are refused with
    a message, the first review stays, and neither click acts on the image the list shows by then (the
    agreed one, first once the disputed image left the list)."""
    agreed, disputed, read_b = _agreed_and_disputed(demo)
    first = _app("views/review.py", annotator="dr.rev", role="reviewer")
    second = _app("views/review.py", annotator="dr.rev2", role="reviewer")
    third = _app("views/review.py", annotator="dr.rev3", role="reviewer")
    assert {at.selectbox(key="review_image_id").value for at in (first, second, third)} == {disputed}
    first.button(key=f"review_accept_{read_b}").click().run()
    assert f"Image {disputed}: saved as its training label" in _texts(first)
    second.button(key="review_merge").click().run()
    assert not second.exception, second.exception
    assert f"Not saved: image {disputed} was changed by someone else" in _texts(second)
    third.button(key="review_edit").click().run()
    assert not third.exception, third.exception
    assert f"Image {disputed} was reviewed by someone else meanwhile" in _texts(third)
    assert "annotate_review" not in third.session_state
    with _sessions(demo)() as s:
        assert image_detail(s, disputed).boxes == [MASS]  # the first review stands
        assert s.get(ImageReview, agreed).status == "consensus"  # untouched: nobody reviewed it
        actions = [(e.action, e.annotator.name) for e in s.scalars(
            select(AuditEntry).where(AuditEntry.action.like("review_%")).order_by(AuditEntry.id))]
    assert actions == [("review_accept", "dr.rev")]
