defmodule Quichex.Stream do
  @moduledoc """
  A QUIC stream is a process. Its pid is the handle every function here
  takes. The process is linked to its connection and has exactly one owner:

    * for a stream you open with `Quichex.Connection.open_stream/3`, you;
    * for a stream the peer opens, the connection's controlling process (or,
      with a `Quichex.Handler`, the handler process serving that stream). The
      owner's first message about it is
      `{:quic_stream_opened, conn, stream, :bidirectional | :unidirectional}`.

  Every message about a stream comes from that stream's process, so they
  arrive in order and only at the owner.

  ## Receiving

  Like `:gen_tcp`, a stream is passive (`active: false`) or active:

    * `active: false` - read with `recv/2`. Data is taken out of quiche only
      when you ask, so a slow reader slows the peer through QUIC flow control.
    * `active: :once` - the next chunk arrives as a message, then the stream
      turns passive again.
    * `active: n` (a positive integer) - `n` chunks arrive as messages, then
      `{:quic_stream_passive, conn, stream}` and the stream turns passive.
    * `active: true` - every chunk arrives as a message as soon as it is
      read. This trades flow control away: data moves from quiche into your
      mailbox as fast as the peer sends it, so a slow owner's mailbox grows.
      Prefer `:once` or `n` for untrusted peers.

  Active messages:

    * `{:quic_stream, conn, stream, data}` - a chunk of data
    * `{:quic_stream_fin, conn, stream}` - the peer finished the stream
    * `{:quic_stream_reset, conn, stream, error_code}` - the peer reset it (RESET_STREAM)
    * `{:quic_stream_passive, conn, stream}` - an `active: n` count ran out

  Sent to the owner in every mode:

    * `{:quic_stream_stopped, conn, stream, error_code}` - the peer asked us to
      stop sending (STOP_SENDING); later sends return `{:error, {:stopped, code}}`
    * `{:quic_stream_closed, conn, stream, reason}` - once, when the connection
      ends before the stream finished

  ## Sending

  `send/3` returns once quiche has accepted every byte, waiting while flow
  or congestion control blocks. It never drops bytes: it returns `:ok`, or
  `{:error, reason}` saying why the rest was not sent (`:timeout`,
  `{:stopped, code}`, `{:reset, code}`, `:closed`). After `{:error, :timeout}`
  a prefix of the data may have been sent; the stream stays usable.

  ## Lifecycle

  The process ends when both directions are done (FIN or reset each way), when
  the connection ends, or when its owner exits. An owner's exit resets the
  stream: RESET_STREAM and STOP_SENDING with error code
  `#{0x0101}` (`owner_down_error_code/0`).

  ## Example

      {:ok, stream} = Quichex.Connection.open_stream(conn, :bidirectional)
      :ok = Quichex.Stream.send(stream, "ping", fin: true)
      {:ok, "pong", true} = Quichex.Stream.recv(stream, length: 0, timeout: 5_000)
  """

  use GenServer, restart: :temporary

  alias Quichex.Config.Schema
  alias Quichex.Telemetry

  @owner_down_code 0x0101
  @chunk 262_144

  @type t :: pid()
  @type active :: boolean() | :once | pos_integer()

  ## Public API

  @doc "The error code used to reset a stream whose owner exited: `#{@owner_down_code}`."
  @spec owner_down_error_code() :: non_neg_integer()
  def owner_down_error_code, do: @owner_down_code

  @doc """
  Sends `data` (iodata). Options: `fin: true` finishes the stream after it,
  `timeout:` milliseconds (default 5000) to wait for flow control.

      :ok = Quichex.Stream.send(stream, ["hello", " ", "world"], fin: false, timeout: 5_000)
  """
  @spec send(t(), iodata(), keyword()) :: :ok | {:error, term()}
  def send(stream, data, opts \\ []) do
    opts = Keyword.validate!(opts, fin: false, timeout: 5_000)
    Schema.validate!(:fin, :boolean, opts[:fin])
    Schema.validate!(:timeout, :timeout, opts[:timeout])

    bin =
      try do
        IO.iodata_to_binary(data)
      rescue
        ArgumentError ->
          raise ArgumentError,
                "Quichex.Stream.send/3 expects iodata, got: #{inspect(data, limit: 5)}"
      end

    call(stream, {:send, bin, opts[:fin], opts[:timeout]}, opts[:timeout])
  end

  @doc """
  Finishes the sending side (sends FIN once all data before it went out).

      :ok = Quichex.Stream.close(stream)
  """
  @spec close(t(), keyword()) :: :ok | {:error, term()}
  def close(stream, opts \\ []), do: send(stream, "", Keyword.put(opts, :fin, true))

  @doc """
  Receives data in passive mode. `length: 0` (default) returns whatever is
  available (waiting for at least one byte or FIN); `length: n` waits for
  exactly `n` bytes, or fewer when the stream finishes first.

  Returns `{:ok, data, fin?}` where `fin?` means the peer finished the stream
  after `data`; `{:error, {:reset, code}}`, `{:error, :closed}`,
  `{:error, :timeout}` or `{:error, :active}` (the stream is in active mode).

      {:ok, data, false} = Quichex.Stream.recv(stream, length: 0, timeout: 5_000)
  """
  @spec recv(t(), keyword()) :: {:ok, binary(), boolean()} | {:error, term()}
  def recv(stream, opts \\ []) do
    opts = Keyword.validate!(opts, length: 0, timeout: 5_000)
    Schema.validate!(:length, :non_neg_integer, opts[:length])
    Schema.validate!(:timeout, :timeout, opts[:timeout])
    call(stream, {:recv, opts[:length], opts[:timeout]}, opts[:timeout])
  end

  @doc """
  Sets options. Only `:active` (`true | false | :once | n`).

      :ok = Quichex.Stream.setopts(stream, active: :once)
  """
  @spec setopts(t(), keyword()) :: :ok | {:error, term()}
  def setopts(stream, opts) do
    opts = Keyword.validate!(opts, [:active])

    case Keyword.fetch(opts, :active) do
      {:ok, active} ->
        validate_active!(active)
        call(stream, {:setopts, active}, 5_000)

      :error ->
        :ok
    end
  end

  @doc """
  Aborts one or both directions with an application `error_code`:
  `:read` sends STOP_SENDING, `:write` sends RESET_STREAM, `:both` both.

      :ok = Quichex.Stream.shutdown(stream, :write, error_code: 42)
  """
  @spec shutdown(t(), :read | :write | :both, keyword()) :: :ok | {:error, term()}
  def shutdown(stream, how, opts \\ []) when how in [:read, :write, :both] do
    opts = Keyword.validate!(opts, error_code: 0)
    Schema.validate!(:error_code, {:integer, 0, 4_611_686_018_427_387_903}, opts[:error_code])
    call(stream, {:shutdown, how, opts[:error_code]}, 5_000)
  end

  @doc """
  Makes `pid` the owner. Only the current owner may call it.

      :ok = Quichex.Stream.controlling_process(stream, pid)
  """
  @spec controlling_process(t(), pid()) :: :ok | {:error, term()}
  def controlling_process(stream, pid) when is_pid(pid) do
    call(stream, {:controlling_process, self(), pid}, 5_000)
  end

  @doc """
  Returns `%{id: id, direction: dir, initiator: :local | :remote, connection: conn, owner: pid}`.

      {:ok, %{id: 0, direction: :bidirectional}} = Quichex.Stream.info(stream)
  """
  @spec info(t()) :: {:ok, map()} | {:error, term()}
  def info(stream), do: call(stream, :info, 5_000)

  @doc false
  def validate_active!(active) do
    Schema.validate!(:active, {:or, [:boolean, {:in, [:once]}, :pos_integer]}, active)
  end

  # Calls never hang on a dead stream. The stream enforces `timeout` itself
  # and answers; the extra second only covers a stream that cannot answer.
  defp call(stream, request, timeout) do
    call_timeout = if timeout == :infinity, do: :infinity, else: timeout + 1_000

    try do
      GenServer.call(stream, request, call_timeout)
    catch
      :exit, {:timeout, _} -> {:error, :timeout}
      :exit, _ -> {:error, :closed}
    end
  end

  @doc false
  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  ## Callbacks

  @impl GenServer
  def init(args) do
    Process.flag(:trap_exit, true)

    state = %{
      conn: args.conn,
      id: args.id,
      owner: args.owner,
      owner_ref: Process.monitor(args.owner),
      active: args.active,
      direction: args.direction,
      initiator: args.initiator,
      started_at: nil,
      # receive side
      recv_done: not args.readable,
      buffer: [],
      buffered: 0,
      fin_received: false,
      reset: nil,
      wanting: false,
      reader: nil,
      # send side
      send_done: not args.writable,
      queue: :queue.new(),
      in_flight: nil,
      stopped: nil,
      owner_gone: false
    }

    meta = %{connection: args.conn, stream: self(), stream_id: args.id, initiator: args.initiator}
    state = %{state | started_at: Telemetry.start(:stream, meta)}

    if args.initiator == :remote do
      Kernel.send(args.owner, {:quic_stream_opened, args.conn, self(), args.direction})
    end

    {:ok, want_more(state)}
  end

  @impl GenServer
  def handle_call({:send, _bin, _fin, _timeout}, _from, %{send_done: true} = state) do
    {:reply, {:error, send_closed_reason(state)}, state}
  end

  def handle_call({:send, bin, fin, timeout}, from, state) do
    deadline = if timeout == :infinity, do: :infinity, else: now() + timeout
    state = %{state | queue: :queue.in({from, bin, fin, deadline}, state.queue)}
    {:noreply, dispatch_send(state)}
  end

  def handle_call({:recv, _length, _timeout}, _from, %{active: active} = state)
      when active != false do
    {:reply, {:error, :active}, state}
  end

  def handle_call({:recv, _length, _timeout}, _from, %{reader: reader} = state)
      when reader != nil do
    {:reply, {:error, :busy}, state}
  end

  def handle_call({:recv, length, timeout}, from, state) do
    case take(state, length) do
      {:reply, reply, state} ->
        reply(reply, state)

      :wait ->
        timer =
          if timeout == :infinity,
            do: nil,
            else: Process.send_after(self(), {:recv_timeout, from}, timeout)

        state = %{state | reader: {from, length, timer}}
        {:noreply, want_more(state)}
    end
  end

  def handle_call({:setopts, active}, _from, state) do
    state = %{state | active: active}
    state = flush_buffer_active(state)
    reply(:ok, want_more(state))
  end

  def handle_call({:shutdown, how, code}, _from, state) do
    dirs =
      case how do
        :read -> [:read]
        :write -> [:write]
        :both -> [:read, :write]
      end

    dirs =
      Enum.filter(dirs, fn
        :read -> not state.recv_done
        :write -> not state.send_done
      end)

    if dirs != [], do: cast_conn(state, {:shutdown, state.id, dirs, code})

    state =
      Enum.reduce(dirs, state, fn
        :read, acc ->
          %{acc | recv_done: true, buffer: [], buffered: 0} |> fail_reader({:error, :closed})

        :write, acc ->
          %{acc | send_done: true} |> fail_queue({:error, :closed})
      end)

    reply(:ok, state)
  end

  def handle_call({:controlling_process, caller, pid}, _from, %{owner: caller} = state) do
    Process.demonitor(state.owner_ref, [:flush])
    {:reply, :ok, %{state | owner: pid, owner_ref: Process.monitor(pid)}}
  end

  def handle_call({:controlling_process, _caller, _pid}, _from, state) do
    {:reply, {:error, :not_owner}, state}
  end

  def handle_call(:info, _from, state) do
    info = %{
      id: state.id,
      direction: state.direction,
      initiator: state.initiator,
      connection: state.conn,
      owner: state.owner
    }

    {:reply, {:ok, info}, state}
  end

  @impl GenServer
  def handle_cast({:setopts, active}, state) do
    state = %{state | active: active} |> flush_buffer_active() |> want_more()
    noreply(state)
  end

  @impl GenServer
  def handle_info({:quic_data, bin, fin}, state) do
    state = %{state | wanting: false}
    state = on_data(state, bin, fin)
    noreply(want_more(state))
  end

  def handle_info({:quic_reset, code}, state) do
    state = %{state | wanting: false, reset: code}

    state =
      cond do
        state.active != false ->
          notify(state, {:quic_stream_reset, state.conn, self(), code})
          %{state | recv_done: true}

        state.reader != nil ->
          %{state | recv_done: true, buffer: [], buffered: 0}
          |> fail_reader({:error, {:reset, code}})

        true ->
          # Reported by the next recv/2, after any data read before the reset.
          state
      end

    noreply(state)
  end

  def handle_info({:quic_error, reason}, state) do
    state = %{state | wanting: false, recv_done: true} |> fail_reader({:error, reason})
    noreply(state)
  end

  def handle_info({:quic_stopped, code}, state) do
    # Sent in every mode: it is about our sending side, not data to read.
    notify(state, {:quic_stream_stopped, state.conn, self(), code})
    state = %{state | stopped: code, send_done: true} |> fail_queue({:error, {:stopped, code}})
    noreply(state)
  end

  def handle_info({:quic_send_result, ref, result}, %{in_flight: {ref, _from, fin}} = state) do
    state = %{state | in_flight: nil}

    state =
      case result do
        :ok when fin ->
          %{state | send_done: true} |> fail_queue({:error, :closed})

        :ok ->
          state

        {:error, {:stopped, code}} ->
          %{state | stopped: code, send_done: true} |> fail_queue({:error, {:stopped, code}})

        {:error, :timeout} ->
          state

        {:error, _} ->
          %{state | send_done: true} |> fail_queue(result)
      end

    if state.owner_gone, do: owner_down(state), else: noreply(dispatch_send(state))
  end

  def handle_info({:quic_send_result, _ref, _result}, state), do: {:noreply, state}

  def handle_info({:recv_timeout, from}, %{reader: {from, _, _}} = state) do
    GenServer.reply(from, {:error, :timeout})
    {:noreply, %{state | reader: nil}}
  end

  def handle_info({:recv_timeout, _from}, state), do: {:noreply, state}

  def handle_info({:quic_conn_closed, reason}, state), do: conn_gone(state, reason)

  def handle_info({:EXIT, conn, reason}, %{conn: conn} = state),
    do: conn_gone(state, {:connection_down, reason})

  def handle_info({:EXIT, _pid, _reason}, state), do: {:noreply, state}

  # The connection answers a send's caller before telling us, so an owner
  # that exits right after its last send (say, with fin: true) can be seen
  # going down before we learn the send completed: wait for that result.
  def handle_info(
        {:DOWN, ref, :process, _pid, _reason},
        %{owner_ref: ref, in_flight: {_, _, _}} = state
      ) do
    {:noreply, %{fail_queue(state, {:error, :closed}) | owner_ref: nil, owner_gone: true}}
  end

  def handle_info({:DOWN, ref, :process, _pid, _reason}, %{owner_ref: ref} = state) do
    owner_down(%{state | owner_ref: nil})
  end

  def handle_info(_msg, state), do: {:noreply, state}

  @impl GenServer
  def terminate(reason, state) do
    Telemetry.stop(:stream, state.started_at, %{
      connection: state.conn,
      stream: self(),
      stream_id: state.id,
      reason: reason
    })
  end

  # The owner is gone: abort what is still open (RESET_STREAM / STOP_SENDING
  # with the owner-down code) and end.
  defp owner_down(state) do
    dirs =
      Enum.reject([read: state.recv_done, write: state.send_done], &elem(&1, 1)) |> Keyword.keys()

    if dirs != [], do: cast_conn(state, {:shutdown, state.id, dirs, @owner_down_code})
    state = state |> fail_reader({:error, :closed}) |> fail_queue({:error, :closed})
    {:stop, :normal, state}
  end

  ## Receive side

  defp want_more(%{recv_done: true} = state), do: state
  defp want_more(%{wanting: true} = state), do: state
  defp want_more(%{fin_received: true} = state), do: state
  defp want_more(%{reset: code} = state) when code != nil, do: state

  defp want_more(state) do
    max =
      cond do
        state.active != false -> @chunk
        state.reader != nil -> reader_need(state)
        true -> 0
      end

    if max > 0 do
      cast_conn(state, {:want, state.id, max})
      %{state | wanting: true}
    else
      state
    end
  end

  defp reader_need(%{reader: {_from, 0, _}}), do: @chunk

  defp reader_need(%{reader: {_from, length, _}, buffered: buffered}),
    do: min(max(length - buffered, 1), @chunk)

  defp on_data(%{active: false} = state, bin, fin) do
    state = %{
      state
      | buffer: [state.buffer | bin],
        buffered: state.buffered + byte_size(bin),
        fin_received: fin
    }

    case state.reader do
      {from, length, timer} ->
        case take(state, length) do
          {:reply, reply, state} ->
            if timer, do: Process.cancel_timer(timer)
            GenServer.reply(from, reply)
            %{state | reader: nil}

          :wait ->
            state
        end

      nil ->
        state
    end
  end

  defp on_data(state, bin, fin) do
    if bin != "", do: notify(state, {:quic_stream, state.conn, self(), bin})

    state =
      if fin do
        notify(state, {:quic_stream_fin, state.conn, self()})
        %{state | fin_received: true, recv_done: true}
      else
        state
      end

    count_active(state)
  end

  defp count_active(%{active: :once} = state), do: %{state | active: false}

  defp count_active(%{active: 1} = state) do
    notify(state, {:quic_stream_passive, state.conn, self()})
    %{state | active: false}
  end

  defp count_active(%{active: n} = state) when is_integer(n), do: %{state | active: n - 1}
  defp count_active(state), do: state

  # Passive buffered data moves to the owner when it turns active.
  defp flush_buffer_active(%{active: false} = state), do: state

  defp flush_buffer_active(%{buffered: 0, fin_received: fin, recv_done: done} = state) do
    if fin and not done do
      notify(state, {:quic_stream_fin, state.conn, self()})
      %{state | recv_done: true}
    else
      state
    end
  end

  defp flush_buffer_active(state) do
    bin = IO.iodata_to_binary(state.buffer)
    state = %{state | buffer: [], buffered: 0}
    on_data(state, bin, state.fin_received)
  end

  # {:reply, reply, state} when the passive read can be answered now.
  defp take(%{buffered: 0, fin_received: true, recv_done: false} = state, _length) do
    {:reply, {:ok, "", true}, %{state | recv_done: true}}
  end

  defp take(%{buffered: 0, reset: code} = state, _length) when code != nil do
    {:reply, {:error, {:reset, code}}, %{state | recv_done: true}}
  end

  defp take(%{buffered: 0, recv_done: true} = state, _length),
    do: {:reply, {:error, :closed}, state}

  defp take(%{buffered: 0} = _state, _length), do: :wait

  defp take(state, length) when length == 0 or length <= state.buffered or state.fin_received do
    all = IO.iodata_to_binary(state.buffer)
    n = if length == 0, do: byte_size(all), else: min(length, byte_size(all))
    <<out::binary-size(n), rest::binary>> = all
    fin? = rest == "" and state.fin_received
    state = %{state | buffer: if(rest == "", do: [], else: [rest]), buffered: byte_size(rest)}
    state = if fin?, do: %{state | recv_done: true}, else: state
    {:reply, {:ok, out, fin?}, state}
  end

  defp take(_state, _length), do: :wait

  defp fail_reader(%{reader: {from, _, timer}} = state, reply) do
    if timer, do: Process.cancel_timer(timer)
    GenServer.reply(from, reply)
    %{state | reader: nil}
  end

  defp fail_reader(state, _reply), do: state

  ## Send side

  defp dispatch_send(%{in_flight: nil} = state) do
    case :queue.out(state.queue) do
      {{:value, {from, bin, fin, deadline}}, queue} ->
        remaining = if deadline == :infinity, do: :infinity, else: max(deadline - now(), 0)
        ref = make_ref()
        # The connection answers the caller itself (after telling us), which
        # saves a process hop on every send.
        cast_conn(state, {:send, state.id, ref, bin, fin, remaining, from})
        %{state | queue: queue, in_flight: {ref, from, fin}}

      {:empty, _} ->
        state
    end
  end

  defp dispatch_send(state), do: state

  defp fail_queue(state, reply) do
    Enum.each(:queue.to_list(state.queue), fn {from, _, _, _} -> GenServer.reply(from, reply) end)
    %{state | queue: :queue.new()}
  end

  defp send_closed_reason(%{stopped: code}) when code != nil, do: {:stopped, code}
  defp send_closed_reason(_state), do: :closed

  ## Helpers

  defp conn_gone(state, reason) do
    finished? = state.recv_done and state.send_done
    if not finished?, do: notify(state, {:quic_stream_closed, state.conn, self(), reason})

    state = state |> fail_reader({:error, :closed}) |> fail_queue({:error, :closed})

    case state.in_flight do
      {_ref, from, _fin} -> GenServer.reply(from, {:error, :closed})
      nil -> :ok
    end

    {:stop, :normal, %{state | in_flight: nil}}
  end

  defp finished?(state), do: state.recv_done and state.send_done and state.in_flight == nil

  defp reply(reply, state) do
    if finished?(state), do: {:stop, :normal, reply, state}, else: {:reply, reply, state}
  end

  defp noreply(state) do
    if finished?(state), do: {:stop, :normal, state}, else: {:noreply, state}
  end

  defp notify(state, msg), do: Kernel.send(state.owner, msg)

  defp cast_conn(state, msg), do: :gen_statem.cast(state.conn, {:stream, msg})

  defp now, do: System.monotonic_time(:millisecond)
end
