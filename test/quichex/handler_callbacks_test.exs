defmodule Quichex.HandlerCallbacksTest do
  # The connection-level callbacks of Quichex.Handler (handle_info/2,
  # handle_timeout/2, and what each return value does to the connection),
  # and the Quichex.Stream functions called from inside a stream callback,
  # where `stream` is the calling process itself.
  use ExUnit.Case, async: true

  # One test makes a handler return a bad value on purpose: its report shows
  # only on failure.
  @moduletag :capture_log

  import Quichex.Test.Helpers

  alias Quichex.{ApplicationError, Connection, Handler, Listener, Stream}

  # Connection callbacks, steered by the test through handle_info/2.
  defmodule ConnectionDriven do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_connection(conn, %{test: test} = state) do
      send(test, {:connected, conn, self()})
      {:continue, state}
    end

    @impl Quichex.Handler
    def handle_info({:reply, ref}, state) do
      send(state.test, {:info, ref})
      {:continue, state}
    end

    def handle_info({:continue_for, ms}, state), do: {:continue, state, ms}
    def handle_info(:close, state), do: {:close, state}
    def handle_info({:error, reason}, state), do: {:error, reason, state}
    def handle_info(:bad_return, _state), do: :not_a_result

    @impl Quichex.Handler
    def handle_timeout(conn, state) do
      send(state.test, {:timeout, conn})
      {:continue, state}
    end

    @impl Quichex.Handler
    def handle_close(conn, reason, state), do: send(state.test, {:closed, conn, reason})
  end

  # Stream functions called from inside stream callbacks. The first chunk
  # names what to do; the results go to the test.
  defmodule StreamSelf do
    use Quichex.Handler

    @impl Quichex.Handler
    def handle_data("inspect", stream, state) do
      send(state.test, {:inspect, stream, self(), Stream.info(stream)})
      send(state.test, {:recv, Stream.recv(stream)})

      send(
        state.test,
        {:setopts, Stream.setopts(stream, active: true), Stream.setopts(stream, [])}
      )

      send(state.test, {:priority, Stream.set_priority(stream, urgency: 1, incremental: false)})
      {:continue, state}
    end

    def handle_data("reset " <> code, stream, state) do
      send(
        state.test,
        {:shutdown, Stream.shutdown(stream, :write, error_code: String.to_integer(code))}
      )

      {:continue, state}
    end

    def handle_data("hand over", stream, state) do
      dead = spawn(fn -> :ok end)
      ref = Process.monitor(dead)
      receive do: ({:DOWN, ^ref, _, _, _} -> :ok)
      send(state.test, {:dead_owner, Stream.controlling_process(stream, dead)})
      send(state.test, {:handed, stream, Stream.controlling_process(stream, state.test)})
      {:continue, state}
    end

    def handle_data(data, _stream, state) do
      send(state.test, {:handler_data, data})
      {:continue, state}
    end

    @impl Quichex.Handler
    def handle_info(msg, stream, state) do
      send(state.test, {:stream_info, stream, msg})
      {:continue, state}
    end
  end

  defp listener!(handler) do
    {listener, port} = start_listener(handler: handler, handler_options: %{test: self()})
    on_exit(fn -> Listener.stop(listener) end)
    port
  end

  describe "connection callbacks" do
    setup do
      port = listener!(ConnectionDriven)
      conn = connect!(port)
      assert_receive {:connected, server_conn, handler}
      %{conn: conn, server_conn: server_conn, handler: handler}
    end

    test "handle_info/2 gets the handler process's other messages", %{handler: handler} do
      ref = make_ref()
      send(handler, {:reply, ref})
      assert_receive {:info, ^ref}
    end

    test "{:continue, state, timeout} runs handle_timeout/2 with the connection when nothing comes",
         %{handler: handler, server_conn: server_conn} do
      send(handler, {:continue_for, 10})
      assert_receive {:timeout, ^server_conn}
      # {:continue, state} from handle_timeout/2 sets no new timeout.
      ref = make_ref()
      send(handler, {:reply, ref})
      assert_receive {:info, ^ref}
      refute_received {:timeout, _}
    end

    test "{:close, state} closes the connection with application code 0", ctx do
      send(ctx.handler, :close)
      conn = ctx.conn
      assert_receive {:quic_connection_closed, ^conn, 0, %ApplicationError{code: 0}}
      server_conn = ctx.server_conn
      assert_receive {:closed, ^server_conn, _reason}
    end

    test "{:error, reason, state} closes it with Handler.error_code/0 and the reason as phrase",
         ctx do
      send(ctx.handler, {:error, :no_quota})
      conn = ctx.conn
      code = Handler.error_code()

      assert_receive {:quic_connection_closed, ^conn, ^code,
                      %ApplicationError{code: ^code, phrase: ":no_quota"}}
    end

    test "a bad return value is a crash: the connection closes with code 0, the listener stays",
         ctx do
      ref = Process.monitor(ctx.handler)
      send(ctx.handler, :bad_return)
      assert_receive {:DOWN, ^ref, :process, _, {%ArgumentError{message: message}, _stack}}
      assert message =~ "a Quichex.Handler callback returned :not_a_result"
      conn = ctx.conn
      assert_receive {:quic_connection_closed, ^conn, 0, %ApplicationError{code: 0}}
    end
  end

  describe "Stream functions inside a stream callback" do
    setup do
      port = listener!(StreamSelf)
      conn = connect!(port)
      {:ok, stream} = Connection.open_stream(conn, :bidirectional, active: false)
      %{conn: conn, stream: stream}
    end

    test "info/1 answers from the process itself; recv/2 and setopts/2 say a handler reads",
         %{stream: stream} do
      :ok = Stream.send(stream, "inspect")
      assert_receive {:inspect, server_stream, handler, {:ok, info}}
      assert server_stream == handler
      assert %{id: 0, direction: :bidirectional, initiator: :remote, owner: ^handler} = info
      assert_receive {:recv, {:error, :active}}
      assert_receive {:setopts, {:error, :handler}, :ok}
      assert_receive {:priority, :ok}

      # From outside, too, a handler's stream cannot be switched to messages.
      assert {:error, :handler} = Stream.setopts(server_stream, active: true)
    end

    test "handle_info/3 gets the stream process's other messages", %{stream: stream} do
      :ok = Stream.send(stream, "inspect")
      assert_receive {:inspect, server_stream, _, {:ok, _}}
      ref = make_ref()
      send(server_stream, {:ping, ref})
      assert_receive {:stream_info, ^server_stream, {:ping, ^ref}}
    end

    test "shutdown(:write) resets our sending side with the code", %{stream: stream} do
      :ok = Stream.send(stream, "reset 42")
      assert_receive {:shutdown, :ok}
      assert {:error, {:reset, 42}} = Stream.recv(stream, timeout: 5_000)
    end

    test "controlling_process/2 hands the stream over: data then comes as messages",
         %{conn: conn, stream: stream} do
      :ok = Stream.send(stream, "hand over")
      assert_receive {:dead_owner, {:error, :dead_owner}}
      assert_receive {:handed, server_stream, :ok}
      :ok = Stream.setopts(server_stream, active: true)
      # The handler's callbacks stop; the new owner gets the stream's data.
      :ok = Stream.send(stream, "after", fin: true)
      assert_receive {:quic_stream, _server_conn, ^server_stream, "after"}
      assert_receive {:quic_stream_fin, _server_conn, ^server_stream}
      refute_received {:handler_data, _}
      assert {:ok, %{owner: owner}} = Stream.info(server_stream)
      assert owner == self()
      assert {:ok, _} = Connection.info(conn)
    end
  end
end
