"""The wire helpers produce exactly what protobuf itself would."""

from __future__ import annotations

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server import wire


def _post(n: int) -> pb.Post:
    return pb.Post(id=f"p{n}", title="t" * (n * 37), views=n)  # lengths that need 1- and 2-byte varints


def test_framed_payloads_parse_as_the_response_protobuf_would_write() -> None:
    posts = [_post(n) for n in range(8)]
    framed = wire.frame_all(1, [p.SerializeToString() for p in posts])
    assert framed == pb.GetTrendingResponse(posts=posts).SerializeToString()
    assert (
        wire.frame(1, posts[5].SerializeToString()) == pb.GetPostResponse(post=posts[5]).SerializeToString()
    )


def test_take_records_cuts_a_list_to_its_first_records() -> None:
    posts = [_post(n) for n in range(8)]
    whole = pb.GetTrendingResponse(posts=posts).SerializeToString()
    for count in (0, 1, 3, 8, 20):
        cut = pb.GetTrendingResponse.FromString(wire.take_records(whole, count))
        assert list(cut.posts) == posts[:count]


def test_concatenated_user_parts_merge_into_one_user() -> None:
    user = pb.User(id="u", name="n")
    profile = wire.frame(6, pb.Profile(bio="b").SerializeToString())
    settings = wire.frame(7, pb.UserSettings(theme="dark").SerializeToString())
    merged = pb.User.FromString(user.SerializeToString() + profile + settings)
    assert merged == pb.User(
        id="u", name="n", profile=pb.Profile(bio="b"), settings=pb.UserSettings(theme="dark")
    )
