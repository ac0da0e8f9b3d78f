"""Steps 6-7, export and deploy: ONNX export, the model process, the server, the endpoint client."""
