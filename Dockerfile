# The image for every node of a GPU Ray cluster and for the driver: they must all run the same
# Ray and Python, so start from Ray's own GPU image of the pinned version and install the project.
# KubeRay replaces the command with `ray start`; the entrypoint below is for plain `docker run`.
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /opt/condense-pipeline
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users condense_pipeline ./condense_pipeline
RUN pip install --no-cache-dir .
ENTRYPOINT ["condense-pipeline"]
CMD ["--help"]
