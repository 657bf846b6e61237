defmodule Quichex.Telemetry do
  @moduledoc """
  Telemetry events. They are emitted only when the `:telemetry` application
  is available (add `{:telemetry, "~> 1.0"}` to your deps); otherwise they
  cost one cached check.

      :telemetry.attach_many(
        "my-app-quic",
        [[:quichex, :connection, :handshake], [:quichex, :connection, :stop]],
        fn event, measurements, metadata, _config ->
          MyApp.Metrics.record(event, measurements, metadata.role)
        end,
        nil
      )

  ## Listener

    * `[:quichex, :listener, :start]` - a listener opened its socket.
      Measurements: `%{monotonic_time: integer, system_time: integer}`.
      Metadata: `%{listener: pid, local_address: {ip, port}}`.
    * `[:quichex, :listener, :stop]` - a listener's socket closed.
      Measurements: `%{monotonic_time: integer, duration: integer}` (native units).
      Metadata: `%{listener: pid, local_address: {ip, port}}`.

  ## Connection

    * `[:quichex, :connection, :start]` - a connection process started.
      Measurements: `%{monotonic_time: integer, system_time: integer}`.
      Metadata: `%{connection: pid, role: :client | :server, peer_address: {ip, port}}`.
    * `[:quichex, :connection, :handshake]` - the handshake completed (the
      connection is established).
      Measurements: `%{duration: integer}` (native units, since start).
      Metadata: `%{connection: pid, role: atom, peer_address: {ip, port}, alpn: binary, retry: boolean}`.
    * `[:quichex, :connection, :stop]` - a connection process ended (closed).
      Measurements: `%{monotonic_time: integer, duration: integer, bytes_sent: integer,
      bytes_received: integer, packets_sent: integer, packets_received: integer,
      packets_lost: integer}`.
      Metadata: `%{connection: pid, role: atom, peer_address: {ip, port}, reason: term}`,
      where `reason` is the close reason delivered to the owner.
    * `[:quichex, :connection, :packets_lost]` - quiche declared packets lost
      since the last driver pass (at most one event per pass).
      Measurements: `%{count: integer, total: integer}` (new losses, losses so far).
      Metadata: `%{connection: pid, role: atom, peer_address: {ip, port}}`.
    * `[:quichex, :connection, :datagrams_dropped]` - DATAGRAM frames were
      dropped in a driver pass: received ones a full queue could not keep,
      or ones to send that the send queue or the path refused.
      Measurements: `%{count: integer}`.
      Metadata: `%{connection: pid, role: atom, peer_address: {ip, port}}`.
    * `[:quichex, :connection, :log_failed]` - the connection's key log or
      qlog file could not be opened or written (reported once per
      connection; the connection is not affected).
      Measurements: `%{}`.
      Metadata: `%{connection: pid, role: atom, peer_address: {ip, port}, reason: String.t()}`.

    * `[:quichex, :connection, :early_data]` - the outcome of 0-RTT, once the
      handshake completed: on a client that sent early data, and on a server
      that was offered some.
      Measurements: `%{}`.
      Metadata: `%{connection: pid, role: atom, peer_address: {ip, port},
      outcome: :accepted | :rejected, reason: atom | nil}` (`reason` says why
      it was rejected, as in `{:quic_early_data, conn, {:rejected, reason}}`).

  ## Stream

    * `[:quichex, :stream, :start]` - a stream process started.
      Measurements: `%{monotonic_time: integer, system_time: integer}`.
      Metadata: `%{connection: pid, stream: pid, stream_id: integer, initiator: :local | :remote}`.
    * `[:quichex, :stream, :stop]` - a stream process ended.
      Measurements: `%{monotonic_time: integer, duration: integer}`.
      Metadata: `%{connection: pid, stream: pid, stream_id: integer, reason: term}`.
  """

  @doc false
  @spec enabled?() :: boolean()
  def enabled? do
    case :persistent_term.get({__MODULE__, :enabled}, :unknown) do
      :unknown ->
        enabled = Code.ensure_loaded?(:telemetry) and function_exported?(:telemetry, :execute, 3)
        :persistent_term.put({__MODULE__, :enabled}, enabled)
        enabled

      enabled ->
        enabled
    end
  end

  @doc false
  @spec execute([atom()], map(), map()) :: :ok
  def execute(event, measurements, metadata) do
    if enabled?() do
      # Called through apply/3 so the library compiles without :telemetry.
      apply(:telemetry, :execute, [event, measurements, metadata])
    end

    :ok
  end

  @doc false
  def start(kind, metadata, extra \\ %{}) do
    now = System.monotonic_time()

    execute(
      [:quichex, kind, :start],
      Map.merge(%{monotonic_time: now, system_time: System.system_time()}, extra),
      metadata
    )

    now
  end

  @doc false
  def stop(kind, start_time, metadata, extra \\ %{}) do
    now = System.monotonic_time()

    execute(
      [:quichex, kind, :stop],
      Map.merge(%{monotonic_time: now, duration: now - start_time}, extra),
      metadata
    )
  end
end
