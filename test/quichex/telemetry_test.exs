defmodule Quichex.TelemetryTest do
  # Every event Quichex.Telemetry lists, each seen by an attached handler.
  use ExUnit.Case, async: true

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Listener, Stream}
  alias Quichex.Test.FaultProxy

  @events [
    [:quichex, :listener, :start],
    [:quichex, :listener, :stop],
    [:quichex, :connection, :start],
    [:quichex, :connection, :handshake],
    [:quichex, :connection, :stop],
    [:quichex, :connection, :packets_lost],
    [:quichex, :connection, :datagrams_dropped],
    [:quichex, :connection, :log_failed],
    [:quichex, :connection, :early_data],
    [:quichex, :stream, :start],
    [:quichex, :stream, :stop]
  ]

  defmodule Echo do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_data(data, stream, state) do
      case Quichex.Stream.send(stream, data, timeout: 30_000) do
        :ok -> {:continue, state}
        {:error, _} -> {:close, state}
      end
    end

    @impl Quichex.Handler
    def handle_datagram(data, conn, state) do
      _ = Quichex.Connection.dgram_send(conn, data)
      {:continue, state}
    end
  end

  setup do
    test = self()
    id = {__MODULE__, make_ref()}
    :ok = :telemetry.attach_many(id, @events, &__MODULE__.forward/4, test)
    on_exit(fn -> :telemetry.detach(id) end)
    :ok
  end

  @doc false
  def forward(event, measurements, metadata, test),
    do: send(test, {:telemetry, event, measurements, metadata})

  test "the moduledoc lists exactly the events emitted" do
    {:docs_v1, _, _, _, %{"en" => doc}, _, _} = Code.fetch_docs(Quichex.Telemetry)

    for event <- @events do
      assert doc =~ inspect(event), "#{inspect(event)} is not documented"
    end

    documented = Regex.scan(~r/`(\[:quichex, [^\]]+\])`/, doc) |> Enum.map(&List.last/1)
    assert Enum.sort(Enum.uniq(documented)) == Enum.sort(Enum.map(@events, &inspect/1))
  end

  test "listener, connection and stream spans, the handshake" do
    {listener, port} = start_listener()

    assert_receive {:telemetry, [:quichex, :listener, :start], %{system_time: _},
                    %{listener: ^listener}}

    conn = connect!(port)

    assert_receive {:telemetry, [:quichex, :connection, :start], %{system_time: _},
                    %{connection: ^conn, role: :client}}

    assert_receive {:telemetry, [:quichex, :connection, :handshake], %{duration: d},
                    %{connection: ^conn, alpn: "quichex-test", retry: false}}

    assert d > 0
    {:ok, stream} = Connection.open_stream(conn)

    assert_receive {:telemetry, [:quichex, :stream, :start], _,
                    %{stream: ^stream, connection: ^conn, stream_id: 0, initiator: :local}}

    :ok = Stream.shutdown(stream, :both)

    assert_receive {:telemetry, [:quichex, :stream, :stop], %{duration: _},
                    %{stream: ^stream, stream_id: 0}},
                   2_000

    :ok = Connection.close(conn)

    assert_receive {:telemetry, [:quichex, :connection, :stop],
                    %{bytes_sent: sent, bytes_received: received, packets_lost: _},
                    %{connection: ^conn, reason: :local}},
                   2_000

    assert sent > 0 and received > 0
    :ok = Listener.stop(listener)

    assert_receive {:telemetry, [:quichex, :listener, :stop], %{duration: _},
                    %{listener: ^listener}}
  end

  test "packets lost, when quiche declares new losses" do
    {listener, listener_port} = start_listener(handler: Echo)
    on_exit(fn -> Listener.stop(listener) end)

    {:ok, proxy, port} =
      FaultProxy.start_link(upstream: {{127, 0, 0, 1}, listener_port}, seed: 99, drop: 0.2)

    conn = connect!(port, host: {127, 0, 0, 1}, server_name: "localhost")
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, :crypto.strong_rand_bytes(500_000), fin: true, timeout: 30_000)

    assert_receive {:telemetry, [:quichex, :connection, :packets_lost], %{count: n, total: t},
                    %{connection: _}},
                   30_000

    assert n > 0 and t >= n
    assert FaultProxy.stats(proxy).to_server.dropped > 0
  end

  test "datagrams dropped, when a passive queue overflows" do
    {listener, port} = start_listener(handler: Echo, config_opts: [enable_dgram: true])

    on_exit(fn -> Listener.stop(listener) end)

    conn =
      connect!(port, active: false, config_opts: [enable_dgram: true, dgram_recv_queue_len: 1])

    for i <- 1..20, do: :ok = Connection.dgram_send(conn, "x#{i}")

    assert_receive {:telemetry, [:quichex, :connection, :datagrams_dropped], %{count: n},
                    %{connection: ^conn}},
                   5_000

    assert n > 0
  end

  test "a qlog that cannot be written is reported once, and the connection works" do
    missing = Path.join(System.tmp_dir!(), "quichex-no-such-dir-#{System.unique_integer()}")
    {listener, port} = start_listener()
    on_exit(fn -> Listener.stop(listener) end)
    conn = connect!(port, config_opts: [qlog_dir: missing])

    assert_receive {:telemetry, [:quichex, :connection, :log_failed], %{},
                    %{connection: ^conn, reason: reason}},
                   2_000

    assert reason =~ "qlog"

    refute_receive {:telemetry, [:quichex, :connection, :log_failed], _, %{connection: ^conn}},
                   100

    {:ok, stream} = Connection.open_stream(conn)
    assert :ok = Stream.send(stream, "still fine", fin: true)
  end

  test "the 0-RTT outcome, on both sides" do
    early = [enable_early_data: true]
    {listener, port} = start_listener(config_opts: early)
    on_exit(fn -> Listener.stop(listener) end)

    first = connect!(port, config_opts: early)
    assert_receive {:quic_session_ticket, ^first, ticket}, 5_000
    :ok = Connection.close(first)

    # A plain handshake has no 0-RTT outcome to report.
    refute_received {:telemetry, [:quichex, :connection, :early_data], _, %{connection: ^first}}

    {:ok, conn} =
      Connection.connect(
        host: "localhost",
        port: port,
        config: client_config(early),
        session: ticket,
        early_data: true
      )

    {:ok, stream} = Connection.open_stream(conn)
    :ok = Stream.send(stream, "early", fin: true)

    assert_receive {:telemetry, [:quichex, :connection, :early_data], %{},
                    %{connection: ^conn, role: :client, outcome: :accepted, reason: nil}},
                   5_000

    # Other tests' servers report too: this one's peer is our port.
    {:ok, %{local_address: {_, local_port}}} = Connection.info(conn)

    assert_receive {:telemetry, [:quichex, :connection, :early_data], %{},
                    %{role: :server, outcome: :accepted, peer_address: {_, ^local_port}}},
                   5_000
  end
end
