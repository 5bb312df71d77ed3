"""Signed evidence: a verifiable, content-addressed receipt for every budget decision.

The user-facing description (what is signed, how an outsider verifies it, keys, retention) is
``docs/evidence.md``; this is the design, for whoever changes it.

Modules:

* :mod:`.canonical`: RFC 8785 bytes (``orjson`` fast path proven equal to the ``rfc8785``
  reference on the values we emit; the reference for the rest).
* :mod:`.keys`: the Ed25519 key ring (file with mode 0600, validity windows, rotation,
  the public JWK Set).
* :mod:`.issuer`: envelopes from requests and responses (the spec's mirror schemas), the
  synchronous ``evidence_id``, signing on read.
* :mod:`.records`: :class:`~.records.EvidenceRow`, the stored form (imported by the ledger).
* :mod:`.api`: the two public routes and the evidence of denials.

Decisions:

* **Id now, signature later.** The ``evidence_id`` is the sha256 of the canonical envelope
  with ``evidence_id`` and ``signature`` empty, so it is computed on the request path without
  signing (one canonical serialisation and one hash, about 25 us). The stored body is the
  envelope with the id filled in: exactly the Ed25519 signing input. It is signed when first
  read (then cached); Ed25519 is deterministic, so every read gives the same envelope, and
  envelopes nobody reads are never signed. The cost: a key's private half must stay in the
  ring as long as envelopes it covers are kept (documented on rotation).
* **No dangling id.** An id goes on an answer only once its envelope is durable. Operations
  that write (decide's and dry-run's idempotency record, reserve, commit, release) carry the
  envelope in their :class:`~runcycles_server.ledger.Outcome`, written by the store in the
  same SQLite transaction / Redis script as everything else (``operations._stamp``), so a
  replay answers the same id and never a second envelope. Denials write nothing else; their
  envelope is stored by ``EvidenceStore.put_evidence`` before the error is answered, which
  SQLite group-commits with concurrent writes and Redis pipelines, so a storm of denials
  costs one shared write per batch, not one each. A failed write answers the denial without
  ``cycles_evidence``. ``tests-integration/test_evidence_crash.py`` SIGKILLs a loaded server
  and resolves every id it returned.
* **Redis Cluster.** An envelope lives in its tenant's slot (``{t:T}:v:<id>``, written by the
  operation's script); a public read knows only the id, so a pointer ``{v:<id>} -> tenant``
  in its own slot is written *ahead* of the script (a pointer whose script then failed reads
  as 404: nothing wrong is ever served). Both expire at the envelope's retention.
* **SQLite.** Envelopes append in issue order (rowid) with no index maintenance on the hot
  path; the sweeper indexes them (the id's first 64 bits, the reservation) in batches of
  thousands, so a content-addressed index's random page writes are paid once per batch, and
  reads scan the short unindexed tail. Retention deletes from the oldest.
* **Redis, one node.** The owner pointer is written by the operation's own script (no extra
  round trip); only a cluster needs the write-ahead above.
* **What is attested** is the spec's mirror schemas: transport-only fields
  (``cycles_evidence``, ``remaining_ttl_ms``) and fields the mirrors lack (``deny_detail``,
  ``observe_mode``, ``action.policy_keys``) are left out, since the mirrors are closed.
  Where the mirrors cannot hold an answer as given, the envelope says what the server did in
  the spec's terms: an observe-mode reservation is attested as the dry run it was evaluated
  as (``request.dry_run: true``), and a denial whose code the closed ``ErrorResponseMirror``
  enum lacks (``ACTION_*``, ``TENANT_SUSPENDED``) as ``FORBIDDEN`` with the answered code in
  ``details.wire_error`` (:data:`.issuer.GENERIC_CODES`). ``extend`` and ``POST /v1/events``
  have no artifact type in the spec and get no envelope.
* **Big integers.** Integers beyond ``2**53 - 1`` have no RFC 8785 form (its input must be
  I-JSON), and the spec types amounts as integers: an answer holding one gets no envelope and
  the header ``X-Cycles-Evidence-Omitted`` instead (:meth:`.api.EvidenceApi.answer`), never an
  envelope independent verifiers cannot re-derive.
* **signer_did** is the raw-hex public key (the v0.1 form): it verifies offline with no
  resolution, and reaches ``authentic`` through the JWK Set's raw-hex bridge; the key that
  signs is the one whose window covers ``issued_at_ms``, as verifiers select it.
"""
