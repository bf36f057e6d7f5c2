"""What every hitless service shares: generated protobuf code (``hitless.v1``), the bus
(``hitless.bus``), typed config, logging, and the release version of this code."""
