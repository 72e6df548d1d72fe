"""Generated gRPC/protobuf code for package ``fleetloop.v1`` (run ``make proto``)."""
