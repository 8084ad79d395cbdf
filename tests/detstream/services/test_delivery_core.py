"""The delivery core (detstream/services/delivery.py), no sockets: hypothesis drives it through
random interleavings of what a session can throw at it, and a model of the nodes checks every
answer.

Stimuli: sectors of positions admitted in any order (duplicates within a batch and across
batches included), acknowledgements (in any order, repeated, and from a fenced node, late),
heartbeats with no progress, the clock, etcd's node list, a dropped connection, END markers
(a second one included), and a fenced node's link coming back (all of it must be ignored).

Checked at every step: a block goes only to a live node, never twice to the same node; no
position's blocks are at two live nodes at once; a fence re-routes exactly the blocks the fenced
node held of its unacknowledged positions, each once, each position to one live node; a fenced
node's messages change nothing. Checked at the end (every sector's END read, every live node
acknowledging what it was sent): every position is acknowledged exactly once, or listed lost
with a reason the model agrees with; FIN goes to exactly the live nodes.

The same machine runs against two broken copies of the core (a re-route dropped, a re-route
doubled) and must find each.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

from detstream.services.delivery import ACKED, WINDOW, Delivery
from detstream.services.delivery_types import (Acked, Admit, Disconnected, EndOfSector, Fence, Finish, Forward,
                                               Heartbeat, InputsDone, Registered, Reject, SendEnd, SendFin, Tick)

NODE_TIMEOUT_S, STALL_S, GRACE_S = 10.0, 60.0, 2.0
DETECTOR_SECTORS = 4


class Violation(AssertionError):
    """The core broke one of the delivery's promises."""


class Blocks:
    """What the test hands the core as a batch: one sector's blocks, by position."""

    def __init__(self, sector: int, positions: np.ndarray):
        self.sector = sector
        self.positions = positions

    def at(self, idx) -> list[tuple[int, int]]:
        pos = self.positions if idx is None else self.positions[np.asarray(idx, dtype=np.int64)]
        return [(int(p), self.sector) for p in pos]


class DeliveryMachine(RuleBasedStateMachine):
    core_class = Delivery
    violated = False

    def check(self, condition: bool, what: str) -> None:
        """A broken promise fails the step (and teardown then checks nothing more, so the
        report names the first one)."""
        if not condition:
            self.violated = True
            raise Violation(what)

    @initialize(nodes=st.integers(1, 3), positions=st.integers(1, 8),
                own=st.sets(st.integers(0, DETECTOR_SECTORS - 1), min_size=1, max_size=3))
    def start(self, nodes, positions, own):
        self.N, self.P, self.own = nodes, positions, sorted(own)
        self.now = 0.0
        self.core = self.core_class(positions, nodes, self.own, DETECTOR_SECTORS, block_nbytes=1, now=0.0,
                                    window_frames=4, node_timeout_s=NODE_TIMEOUT_S, lease_grace_s=GRACE_S,
                                    stall_s=STALL_S)
        self.alive = set(range(nodes))
        self.held = [dict() for _ in range(nodes)]      # node -> {position: sectors it was sent}
        self.admitted = [set() for _ in range(positions)]  # sectors of each position seen by the core
        self.ack_sent: set[int] = set()                 # positions a live node holding them whole acknowledged
        self.last_heard = [0.0] * nodes
        self.last_ack = [0.0] * nodes
        self.ended: set[int] = set()
        self.inputs_done = False
        self.stall_possible = False
        self.fins: list[int] = []

    # -- applying a stimulus and checking the answer -----------------------------------------
    def apply(self, stimulus) -> list:
        """Hand the core a stimulus; check its answer against the model, and update the model."""
        was_open = self.core.state == WINDOW
        answer = self.core.handle(stimulus)
        i = 0
        while i < len(answer):
            ins = answer[i]
            i += 1
            if isinstance(ins, Fence):  # the Forwards that follow are its re-route
                self.check(ins.node in self.alive, f"node {ins.node} fenced twice")
                self.alive.discard(ins.node)
                j = i
                while j < len(answer) and isinstance(answer[j], Forward):
                    j += 1
                self.check_reroute(ins.node, answer[i:j], was_open)
                for fwd in answer[i:j]:
                    self.forwarded(fwd)
                i = j
            elif isinstance(ins, Forward):
                self.forwarded(ins)
            elif isinstance(ins, SendEnd):
                self.check(ins.node in self.alive, f"END to fenced node {ins.node}")
            elif isinstance(ins, SendFin):
                self.check(ins.node in self.alive, f"FIN to fenced node {ins.node}")
                self.fins.append(ins.node)
            else:
                self.check(isinstance(ins, Reject), f"unknown instruction {ins!r}")
        return answer

    def forwarded(self, ins: Forward) -> None:
        self.check(ins.node in self.alive, f"blocks sent to fenced node {ins.node}")
        for p, s in ins.batch.at(ins.idx):
            self.check(s in self.admitted[p], f"block ({p}, {s}) sent but never admitted")
            others = [n for n in self.alive if n != ins.node and p in self.held[n]]
            self.check(not others, f"position {p} at live nodes {others} and {ins.node} at once")
            have = self.held[ins.node].setdefault(p, set())
            self.check(s not in have, f"block ({p}, {s}) sent twice to node {ins.node}")
            have.add(s)

    def check_reroute(self, fenced: int, forwards: list, was_open: np.ndarray) -> None:
        """A fence's Forwards re-route exactly the blocks the fenced node held of its open
        positions, each block once, each position to one live node."""
        expected = {(p, s) for p, secs in self.held[fenced].items() if was_open[p] for s in secs}
        sent: list[tuple[int, int]] = []
        dest: dict[int, set] = {}
        for ins in forwards:
            for p, s in ins.batch.at(ins.idx):
                sent.append((p, s))
                dest.setdefault(p, set()).add(ins.node)
        self.check(len(sent) == len(set(sent)), f"a re-route sent a block twice: {sorted(sent)}")
        self.check(all(len(d) == 1 and d <= self.alive for d in dest.values()),
              f"a re-route sent a position to more than one node, or to a fenced one: {dest}")
        if self.alive:
            self.check(set(sent) == expected, f"a re-route sent {sorted(set(sent))}; node {fenced} held {sorted(expected)}")
        else:
            self.check(not sent, "a re-route with no node left")

    def unchanged(self, stimulus) -> None:
        """A fenced node's message: no answer, and nothing in the core changes."""
        state, acked = self.core.state.copy(), list(self.core.stats.positions_acked)
        self.check(self.apply(stimulus) == [], f"{stimulus!r} from a fenced node was answered")
        self.check((self.core.state == state).all() and self.core.stats.positions_acked == acked,
              f"{stimulus!r} from a fenced node changed the window")

    def whole(self, node: int) -> list[int]:
        return [p for p, secs in self.held[node].items() if len(secs) == len(self.own)]

    # -- the rules -----------------------------------------------------------------------------
    @precondition(lambda self: not self.inputs_done)
    @rule(sector=st.integers(0, DETECTOR_SECTORS - 1), picks=st.lists(st.integers(0, 7), min_size=1, max_size=5))
    def admit(self, sector, picks):
        sector = self.own[sector % len(self.own)]
        if sector in self.ended:
            return
        positions = np.array([p % self.P for p in picks], dtype=np.int64)
        fresh = {int(p) for p in positions if sector not in self.admitted[p]}
        settled = {p for p in fresh if self.core.state[p] > WINDOW}
        for p in fresh - settled:
            self.admitted[p].add(sector)
        answer = self.apply(Admit(sector, positions, Blocks(sector, positions), self.now))
        rejected = sum(isinstance(ins, Reject) for ins in answer)
        self.check(rejected == len(positions) - len(fresh) + len(settled),
              f"{rejected} blocks refused of {positions.tolist()} (new: {sorted(fresh)})")

    @rule(node=st.integers(0, 2), data=st.data())
    def ack(self, node, data):
        node %= self.N
        if node not in self.alive:
            return
        whole = self.whole(node)
        picks = data.draw(st.lists(st.sampled_from(whole), max_size=6) if whole else st.just([]))
        self.send_ack(node, picks)

    def send_ack(self, node: int, positions) -> None:
        self.ack_sent.update(positions)
        self.last_heard[node] = self.last_ack[node] = self.now
        self.apply(Acked(node, np.array(positions, dtype=np.uint32), 0, 0, self.now))

    @rule(node=st.integers(0, 2))
    def heartbeat(self, node):
        node %= self.N
        if node in self.alive:
            self.last_heard[node] = self.now
            self.apply(Heartbeat(node, 0, 0, self.now))

    @rule(node=st.integers(0, 2))
    def disconnect(self, node):
        node %= self.N
        if node in self.alive:
            fences = [i for i in self.apply(Disconnected(node, self.now)) if isinstance(i, Fence)]
            self.check([(f.node, f.reason) for f in fences] == [(node, "disconnected")], f"fenced {fences}")

    @rule(dt=st.sampled_from([0.5, 1.5, 2.5, 11.0, 61.0]))
    def clock(self, dt):
        self.now += dt
        live = sorted(self.alive)
        answer = self.apply(Tick(self.now, self.inputs_done))
        for ins in answer:
            if isinstance(ins, Fence):
                self.check(len(live) > 1, f"the last live node {ins.node} fenced for being slow")
                limit = NODE_TIMEOUT_S if ins.reason.startswith("unreachable") else STALL_S
                since = self.last_heard if ins.reason.startswith("unreachable") else self.last_ack
                self.check(self.now - since[ins.node] > limit, f"node {ins.node} fenced early: {ins.reason}")
        if self.inputs_done and len(self.alive) == 1 and self.now - self.last_ack[live[0]] > STALL_S:
            self.stall_possible = True

    @rule(keep=st.sets(st.integers(0, 2)))
    def registered(self, keep):
        answer = self.apply(Registered(frozenset(keep), self.now))
        for ins in answer:
            if isinstance(ins, Fence):
                self.check(ins.node not in keep and self.now - self.last_heard[ins.node] > GRACE_S,
                      f"node {ins.node} fenced for its key while heard from")

    @precondition(lambda self: not self.inputs_done)
    @rule(sector=st.integers(0, DETECTOR_SECTORS - 1))
    def end(self, sector):
        self.end_sector(self.own[sector % len(self.own)])

    def end_sector(self, sector: int) -> None:
        answer = self.apply(EndOfSector(sector, None, self.now))
        if sector in self.ended:
            self.check(answer == [Reject("duplicate_end", f"second END from sector {sector}")], "a second END")
            return
        self.ended.add(sector)
        self.check({i.node for i in answer if isinstance(i, SendEnd)} == self.alive, "END to every live node")
        if len(self.ended) == len(self.own):
            self.inputs_done = True
            self.apply(InputsDone("incomplete", self.now))

    @rule(node=st.integers(0, 2), data=st.data())
    def fenced_node_speaks(self, node, data):
        """A late ACK from a fenced node, or its link back after the fence: all ignored."""
        node %= self.N
        if node in self.alive:
            return
        held = sorted(self.held[node]) or [0]
        what = data.draw(st.sampled_from(["ack", "heartbeat", "disconnect", "registered"]))
        self.unchanged({"ack": Acked(node, np.array(held, dtype=np.uint32), 9, 9, self.now),
                        "heartbeat": Heartbeat(node, 9, 9, self.now),
                        "disconnect": Disconnected(node, self.now),
                        "registered": Registered(frozenset(range(self.N)), self.now)}[what])

    # -- the end ---------------------------------------------------------------------------------
    def teardown(self):
        if not hasattr(self, "core") or self.violated:
            return
        for sector in self.own:
            if sector not in self.ended:
                self.end_sector(sector)
        for node in sorted(self.alive):
            self.send_ack(node, self.whole(node))
        self.check(self.core.settled, f"positions left unacknowledged: {np.flatnonzero(self.core.state == WINDOW)}")
        self.apply(Finish(self.now))
        self.check(sorted(self.fins) == sorted(self.alive), f"FIN to {self.fins}, live nodes {sorted(self.alive)}")
        self.core.account()
        stats = self.core.stats
        acked = set(np.flatnonzero(self.core.state == ACKED).tolist())
        lost = set(stats.lost)
        self.check(acked | lost == set(range(self.P)) and not acked & lost, f"acked {acked}, lost {lost}")
        self.check(sum(stats.positions_acked) == len(acked), f"acknowledged {stats.positions_acked} for {len(acked)}")
        self.check(acked <= self.ack_sent, f"positions {acked - self.ack_sent} acknowledged by nobody")
        self.check(sum(stats.lost_reasons.values()) == len(lost), f"lost reasons {stats.lost_reasons} for {len(lost)}")
        for why, positions in self.core.lost_why.items():
            for p in positions:
                n = len(self.admitted[p])
                ok = {"never_received": n == 0, "incomplete": 0 < n < len(self.own),
                      "no_node": not self.alive, "stalled": self.stall_possible}.get(why, False)
                self.check(ok, f"position {p} lost as {why!r} ({n} sectors admitted, live nodes {sorted(self.alive)})")


SETTINGS = settings(max_examples=1000, stateful_step_count=30, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("examples", [200, pytest.param(1000, marks=pytest.mark.slow)])
def test_every_position_is_acknowledged_once_or_lost_with_its_reason(examples):
    """1,000 examples take ~13 CPU s here (make test-slow); 200 keep make test-fast under a minute."""
    run_state_machine_as_test(DeliveryMachine, settings=settings(SETTINGS, max_examples=examples))


class DropsAReRoute(Delivery):
    def _resend(self, positions, targets):
        return super()._resend(positions, targets)[1:]


class DoublesAReRoute(Delivery):
    def _resend(self, positions, targets):
        out = super()._resend(positions, targets)
        return out + out


@pytest.mark.parametrize("broken, finding", [(DropsAReRoute, r"a re-route sent \[.*\]; node \d held"),
                                             (DoublesAReRoute, "a re-route sent a block twice")])
def test_the_checks_find_a_broken_re_route(broken, finding):
    """A core that loses a re-route's first message, and one that sends every re-route twice:
    the same rules and checks find each (first failure reported, not shrunk)."""
    machine = type(f"{broken.__name__}Machine", (DeliveryMachine,), {"core_class": broken})
    found = settings(SETTINGS, phases=[Phase.generate], report_multiple_bugs=False)
    with pytest.raises(Violation, match=finding):
        run_state_machine_as_test(machine, settings=found)
