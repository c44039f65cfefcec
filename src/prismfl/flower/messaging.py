"""Messages over a Flower Grid, for the ServerApp: one batch sent, its replies collected with a timeout on
every wait, and each node's reply read or the node dropped with one line saying why."""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from prismfl.errors import PrismError
from prismfl.flower import replies
from prismfl.safestate import StateError

POLL_SECONDS = 0.2


@dataclass
class Exchange:
    """Replies to one batch of messages, by destination node; nodes that never answered are absent."""

    replies: dict[int, Message]
    unsent: list[int]


def exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, timeout: float, group: str) -> Exchange:
    """Send one message per node and collect the replies until all came or `timeout` seconds passed."""
    nodes = list(contents)
    messages = [Message(contents[n], dst_node_id=n, message_type=message_type, ttl=timeout + 5, group_id=group)
                for n in nodes]  # fmt: skip
    ids = list(grid.push_messages(messages))
    pending = {mid: node for mid, node in zip(ids, nodes) if mid}
    unsent = [node for mid, node in zip(ids, nodes) if not mid]
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                replies[node] = reply
        if pending:
            time.sleep(POLL_SECONDS)
    return Exchange(replies, unsent)


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise PrismError(
                f"{len(nodes)} of the {count} SuperNodes this run needs (partition.num_clients) connected within "
                f"{timeout:g} s; start one flower-supernode per client or raise the run config 'connect-timeout'"
            )
        time.sleep(POLL_SECONDS)


def reply_error(reply: Message) -> str:
    """A node's error reply in one bounded line (it is recorded in metrics.jsonl and the checkpoint)."""
    reason = " ".join(str(reply.error.reason).split())
    return f"error {reply.error.code}: {reason[:1000]}{'...' if len(reason) > 1000 else ''}"


def claimed_replies(got: Exchange, nodes: list[int], timeout: float, message: str, failed: str,
                    parse) -> tuple[dict[int, tuple[int, object]], dict[str, str]]:  # fmt: skip
    """Each node's reply through `parse(node, reply) -> (partition, value)`, which raises a NodeError (or a
    StateError) for a reply an honest node of this run does not send. Returns {partition: (node, value)}
    and {node: why} for the nodes dropped: no answer within `timeout`, an error reply (`failed`: what it
    failed to do), a reply `parse` refused or could not read, or a partition two nodes claim (neither can
    be told from the other)."""
    claims: dict[int, list[tuple[int, object]]] = {}
    dropped: dict[str, str] = {}
    for node in nodes:
        reply = got.replies.get(node)
        try:
            if reply is None:
                raise replies.NodeError(f"no answer to the {message} within {timeout:g} s")
            if reply.has_error():
                raise replies.NodeError(f"it failed to {failed}: {reply_error(reply)}")
            pid, value = parse(node, reply)
        except (replies.NodeError, StateError) as exc:
            dropped[str(node)] = str(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a check missed a case: still one node's reply, never the run
            dropped[str(node)] = f"its reply could not be read ({type(exc).__name__}: {str(exc)[:200]})"
            continue
        claims.setdefault(pid, []).append((node, value))
    for pid, claimed in sorted(claims.items()):
        if len(claimed) > 1:
            for node, _ in claimed:
                dropped[str(node)] = f"SuperNodes {', '.join(str(nd) for nd, _ in claimed)} all claim partition {pid}"
    return {pid: claimed[0] for pid, claimed in claims.items() if len(claimed) == 1}, dropped
