"""The web app: uploads, the out-of-distribution rule, the model bundle, the Gradio UI."""
