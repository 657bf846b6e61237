defmodule Quichex.HandlerTest do
  use ExUnit.Case, async: true

  # Some handlers here crash on purpose; their reports show only on failure.
  @moduletag :capture_log

  import Quichex.Test.Helpers

  alias Quichex.{Connection, Handler, Listener, Stream}

  defmodule Echo do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_data(data, stream, state) do
      :ok = Quichex.Stream.send(stream, data)
      {:continue, state}
    end

    @impl Quichex.Handler
    def handle_fin(stream, state) do
      :ok = Quichex.Stream.close(stream)
      {:close, state}
    end
  end

  # Reports every callback to the test process named in handler_options.
  defmodule Reporter do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_connection(conn, %{test: test} = state) do
      send(test, {:handle_connection, conn, self()})
      {:continue, state}
    end

    @impl Quichex.Handler
    def handle_close(conn, reason, %{test: test}) do
      send(test, {:handle_close, conn, reason})
    end

    @impl Quichex.Handler
    def handle_stream_open(stream, %{test: test} = state) do
      send(test, {:handle_stream_open, stream, self()})
      {:continue, Map.put(state, :chunks, [])}
    end

    @impl Quichex.Handler
    def handle_data("crash", _stream, _state), do: raise("handler crash")
    def handle_data("error", _stream, state), do: {:error, :asked_to, state}
    def handle_data("slow", _stream, state), do: {:continue, state, 50}

    def handle_data(data, _stream, state) do
      send(state.test, {:handle_data, data})
      {:continue, %{state | chunks: [state.chunks | data]}}
    end

    @impl Quichex.Handler
    def handle_fin(stream, state) do
      send(state.test, {:handle_fin, IO.iodata_to_binary(state.chunks)})
      :ok = Quichex.Stream.send(stream, "got it", fin: true)
      {:close, state}
    end

    @impl Quichex.Handler
    def handle_reset(code, _stream, state) do
      send(state.test, {:handle_reset, code})
      {:close, state}
    end

    @impl Quichex.Handler
    def handle_stopped(code, _stream, state) do
      send(state.test, {:handle_stopped, code})
      {:close, state}
    end

    @impl Quichex.Handler
    def handle_timeout(_stream, state) do
      send(state.test, :handle_timeout)
      {:close, state}
    end
  end

  defmodule CrashOnConnect do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_connection(_conn, _state), do: raise("boom")
  end

  defp handler_listener(handler, options \\ %{}) do
    {listener, port} = start_listener(handler: handler, handler_options: options)
    on_exit(fn -> Listener.stop(listener) end)
    {listener, port}
  end

  defp read_all(stream, acc \\ []) do
    case Stream.recv(stream, timeout: 5_000) do
      {:ok, data, true} -> {:ok, IO.iodata_to_binary([acc | data])}
      {:ok, data, false} -> read_all(stream, [acc | data])
      error -> error
    end
  end

  test "the Echo handler from the docs echoes many streams byte-exact" do
    {_listener, port} = handler_listener(Echo)
    conn = connect!(port)

    1..16
    |> Task.async_stream(
      fn i ->
        payload = :crypto.strong_rand_bytes(i * 50_000)
        {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
        reader = Task.async(fn -> read_all(stream) end)
        :ok = Stream.send(stream, payload, fin: true, timeout: 10_000)
        result = Task.await(reader, 10_000)
        if result != {:ok, payload}, do: IO.inspect({i, result}, label: "ECHO FAIL")
        result == {:ok, payload}
      end,
      timeout: 20_000
    )
    |> Enum.each(fn {:ok, ok} -> assert ok end)
  end

  test "callbacks run in order with handler_options as the initial state" do
    {_listener, port} = handler_listener(Reporter, %{test: self()})
    conn = connect!(port)
    assert_receive {:handle_connection, _server_conn, conn_handler}
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, "hello ")
    assert_receive {:handle_stream_open, peer_stream, stream_handler}
    assert conn_handler != stream_handler
    # One process per stream: the handler runs in the stream's own process.
    assert stream_handler == peer_stream
    assert_receive {:handle_data, "hello "}
    :ok = Stream.send(stream, "world", fin: true)
    assert_receive {:handle_fin, "hello world"}
    assert {:ok, "got it"} = read_all(stream)

    :ok = Connection.close(conn, error_code: 5, reason: "bye")

    assert_receive {:handle_close, _server_conn,
                    %Quichex.ApplicationError{code: 5, phrase: "bye"}},
                   2_000

    eventually(fn -> not Process.alive?(conn_handler) and not Process.alive?(stream_handler) end)
  end

  test "handle_reset and handle_stopped get the peer's codes" do
    {_listener, port} = handler_listener(Reporter, %{test: self()})
    conn = connect!(port)
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, "x")
    assert_receive {:handle_data, "x"}
    :ok = Stream.shutdown(stream, :write, error_code: 11)
    assert_receive {:handle_reset, 11}

    {:ok, stream2} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream2, "y")
    assert_receive {:handle_data, "y"}
    :ok = Stream.shutdown(stream2, :read, error_code: 12)
    assert_receive {:handle_stopped, 12}, 2_000
  end

  test "{:continue, state, timeout} calls handle_timeout" do
    {_listener, port} = handler_listener(Reporter, %{test: self()})
    conn = connect!(port)
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, "slow")
    assert_receive :handle_timeout, 2_000
  end

  test "{:error, reason, state} resets the stream with the documented code" do
    {_listener, port} = handler_listener(Reporter, %{test: self()})
    conn = connect!(port)
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, "error")
    code = Handler.error_code()
    assert {:error, {:reset, ^code}} = Stream.recv(stream, timeout: 2_000)
  end

  test "a stream handler that raises resets only its stream" do
    {listener, port} = handler_listener(Reporter, %{test: self()})
    conn = connect!(port)
    {:ok, good} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(good, "fine")
    assert_receive {:handle_data, "fine"}

    {:ok, bad} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(bad, "crash")
    code = Stream.owner_down_error_code()
    assert {:error, {:reset, ^code}} = Stream.recv(bad, timeout: 2_000)

    :ok = Stream.send(good, "!", fin: true)
    assert_receive {:handle_fin, "fine!"}
    assert {:ok, "got it"} = read_all(good)
    assert Connection.is_established?(conn)
    assert Process.alive?(listener)
  end

  test "a connection handler that raises closes only its connection" do
    {listener, port} = handler_listener(CrashOnConnect)
    {:ok, conn} = Connection.connect(host: "localhost", port: port, config: client_config())
    assert_receive {:quic_connection_closed, ^conn, 0, %Quichex.ApplicationError{code: 0}}, 5_000
    assert Process.alive?(listener)

    assert {:ok, %{connections: 0}} =
             eventually(fn ->
               match?({:ok, %{connections: 0}}, Listener.stats(listener)) &&
                 Listener.stats(listener)
             end)
  end

  test "handler processes end with their connection" do
    {listener, port} = handler_listener(Reporter, %{test: self()})
    conn = connect!(port)
    assert_receive {:handle_connection, _, conn_handler}
    {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
    :ok = Stream.send(stream, "a")
    assert_receive {:handle_stream_open, _peer, stream_handler}
    :ok = Connection.close(conn)
    eventually(fn -> not Process.alive?(conn_handler) and not Process.alive?(stream_handler) end)
    eventually(fn -> match?({:ok, %{connections: 0}}, Listener.stats(listener)) end)
  end
end
