"""Sources and sinks: the protocols (:mod:`~millstream.io.base`), storage by URI
(:mod:`~millstream.io.fs`), one package per connector (:mod:`~millstream.io.files`,
:mod:`~millstream.io.kafka`), in-memory and generated data, and the generic streaming
sinks (:mod:`~millstream.io.stream_sinks`)."""
