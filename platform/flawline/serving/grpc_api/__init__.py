"""flawline's gRPC API (serve/flawline.proto): the modules protoc generates from it
(``flawline_pb2``, ``flawline_pb2_grpc``; ``python -m flawline.serving.grpc_api.generate`` remakes
them) and the one mapping between its messages and the HTTP API's JSON answers (``convert``).

Importing this package imports nothing; Ray Serve's gRPC proxy imports
``flawline_pb2_grpc.add_InspectionServicer_to_server`` (serve/config.yaml's grpc_options).
"""
