"""CDS Hooks 2.0 protocol layer: Flask app factory, blueprints, auth, cards, feedback."""
