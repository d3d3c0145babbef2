"""The torch.fx side: tracing (with leaf and swap fallbacks), probing shapes, finding candidates, rewriting."""
