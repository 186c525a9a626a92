# The project image: driver, Ray head and Ray GPU workers all run it, so trials import the same code.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends git curl && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY sweeper ./sweeper
COPY trainables ./trainables
COPY search_spaces ./search_spaces
RUN pip install ".[postgres]"
